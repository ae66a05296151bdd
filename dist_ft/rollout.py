"""``RolloutWorker``: generates, scores and returns a ``ScoredBatch``. A plain class; ``cluster.py``
wraps it as a Ray actor, or calls it in-process in debug mode.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from dist_ft.algos.grpo import group_advantages
from dist_ft.batch import ScoredBatch
from dist_ft.config import PeftConfig, PeftMethod
from dist_ft.data import Prompt
from dist_ft.models import (
    completion_logprobs,
    export_state,
    import_state,
    is_adapter,
    load_policy,
    load_tokenizer,
)
from dist_ft.rewards import RewardError, RewardSet
from dist_ft.sync import fingerprint


class RolloutWorker:
    def __init__(
        self,
        *,
        model_path: str,
        dtype: str,
        peft: PeftConfig,
        device: str,
        group_size: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        rewards: list[tuple[str, float, dict[str, Any]]],
        reward_timeout_s: float,
        on_reward_error: str,
        scale_rewards: bool,
        need_ref_logprobs: bool,
        seed: int,
        worker_index: int = 0,
        trust_remote_code: bool = False,
        deterministic: bool = False,
        judge: Any = None,
    ) -> None:
        """``judge``: an RLAIF judge (``JudgeWorker``, or a handle to one on Ray) that the
        reward function named ``judge`` calls through ``score_with_stats``."""
        torch.use_deterministic_algorithms(deterministic)
        self.deterministic = deterministic
        # Each worker samples its own stream: one seed on every worker would duplicate groups.
        torch.manual_seed(seed * 1000 + worker_index)
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.model = load_policy(model_path, dtype, peft, self.device, trust_remote_code).eval()
        self.adapter_only = is_adapter(self.model)
        self.ref_model = None
        if need_ref_logprobs and not self.adapter_only:
            # Full fine-tuning has no adapter to switch off: keep a frozen copy of the start.
            no_peft = PeftConfig(method=PeftMethod.NONE)
            self.ref_model = load_policy(model_path, dtype, no_peft, self.device).eval()
        self.need_ref = need_ref_logprobs
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.scale_rewards = scale_rewards
        self.judge = judge
        self._counters: dict[str, float] = {}
        extra = {"judge": self._judge_reward} if judge is not None else None
        self.rewards = RewardSet(rewards, timeout_s=reward_timeout_s, extra=extra)
        self.on_reward_error = on_reward_error
        self.worker_index = worker_index
        self.version = 0

    # ------------------------------------------------------------------ weights
    def set_weights(self, version: int, tensors: dict[str, torch.Tensor]) -> str:
        """Load a weight sync as policy ``version``; returns the fingerprint read back from the
        model itself, so the caller can prove the worker holds what the learner sent."""
        import_state(self.model, tensors, self.adapter_only)
        self.version = version
        return self.fingerprint()

    def fingerprint(self) -> str:
        return fingerprint(export_state(self.model, self.adapter_only))

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, step: int, prompts: list[Prompt], seed: int) -> ScoredBatch:
        """G completions for each of the B prompts, scored, with group-relative advantages.

        In deterministic mode sampling is seeded by ``seed`` alone (the caller derives it from
        run seed, step and share), so a share issued again after a worker died draws the same
        completions on any worker holding the same weights. Otherwise the worker's own stream
        continues (checkpoints save it).
        """
        t0 = time.perf_counter()
        if self.deterministic:
            torch.manual_seed(seed)
        g = self.group_size
        enc = self.tokenizer(
            [p.text for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False
        )
        prompt_ids = enc["input_ids"].repeat_interleave(g, 0).to(self.device)  # [B*G, P]
        prompt_mask = enc["attention_mask"].repeat_interleave(g, 0).to(self.device)  # [B*G, P]
        out = self.model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0,  # no top-k truncation: behaviour logprobs must be the sampling distribution
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        completion_ids, completion_mask = self._completion(out[:, prompt_ids.shape[1] :])
        args = (prompt_ids, prompt_mask, completion_ids, completion_mask, self.temperature)
        logprobs = completion_logprobs(self.model, *args) * completion_mask  # [B*G, T]
        ref_logprobs = None
        if self.need_ref:
            if self.ref_model is not None:
                ref_logprobs = completion_logprobs(self.ref_model, *args)
            else:  # LoRA: the base model is the policy with its adapter switched off
                with self.model.disable_adapter():
                    ref_logprobs = completion_logprobs(self.model, *args)
            ref_logprobs = ref_logprobs * completion_mask

        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompt_texts = [p.text for p in prompts for _ in range(g)]
        answers = [p.answer for p in prompts for _ in range(g)]
        self._counters = {}
        scores = self.rewards.score(prompt_texts, texts, answers)
        errors_N = scores.errors_NK.any(1)
        if errors_N.any() and self.on_reward_error == "abort":
            raise RewardError(f"step {step}: " + "; ".join(scores.messages.values()))
        # "zero" scores a failed function 0; "mask" leaves the sample out of its group's
        # statistics and of the loss. Either way no NaN reaches the advantages.
        total_N = scores.total(self.rewards.weights, fill=0.0)
        valid_N = ~errors_N if self.on_reward_error == "mask" else torch.ones_like(errors_N)
        adv_BG = group_advantages(
            total_N.view(-1, g), scale=self.scale_rewards, valid_BG=valid_N.view(-1, g)
        )

        n = len(prompts) * g
        sample_ids = torch.tensor(
            [[step, p.index, j] for p in prompts for j in range(g)], dtype=torch.int32
        )
        return ScoredBatch(
            prompt_ids=prompt_ids.to("cpu", torch.int32),
            prompt_mask=prompt_mask.to("cpu", torch.bool),
            completion_ids=completion_ids.to("cpu", torch.int32),
            completion_mask=completion_mask.to("cpu", torch.bool),
            logprobs=logprobs.float().cpu(),
            ref_logprobs=None if ref_logprobs is None else ref_logprobs.float().cpu(),
            rewards=scores.rewards_NK,
            reward_total=total_N,
            reward_errors=scores.errors_NK,
            valid=valid_N,
            advantages=adv_BG.reshape(n).float(),
            sample_ids=sample_ids,
            versions=torch.full((n,), self.version, dtype=torch.int32),
            reward_names=list(self.rewards.names),
            worker_stats={self.worker_index: (n, time.perf_counter() - t0)},
            counters=self._counters,
        )

    def _judge_reward(
        self, prompts: list[str], completions: list[str], answers: list[str | None]
    ) -> list[float]:
        scores, stats = self.judge.score_with_stats(prompts, completions, self.group_size)
        self._counters = {f"judge/{k}": float(v) for k, v in stats.items()}
        return scores

    def _completion(self, generated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to ``max_new_tokens`` and mask everything after the first EOS. [N, T] each."""
        n, t = generated.shape
        pad = self.tokenizer.pad_token_id
        if t < self.max_new_tokens:
            fill = torch.full((n, self.max_new_tokens - t), pad, dtype=generated.dtype)
            generated = torch.cat([generated, fill.to(generated.device)], dim=1)
        is_eos = generated == self.tokenizer.eos_token_id
        # A token is kept if no EOS came strictly before it: the EOS itself is trained on.
        eos_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        mask = ~eos_before
        return generated.masked_fill(~mask, pad), mask.long()
