"""A second :class:`dist_ft.rollout.Generator`, for the seam test: token-by-token sampling with a
full forward per token (no KV cache, no transformers ``generate``), whose logprobs come from the
sampling pass itself. It is plugged in by config (``rollout.generator=generators:NaiveSampler``)
exactly as a user's engine would be."""

from __future__ import annotations

import time
from typing import ClassVar

import torch

from dist_ft.model.loading import load_policy, load_tokenizer
from dist_ft.model.weights import export_state, import_state, is_adapter
from dist_ft.rollout import Generation, GeneratorSpec
from dist_ft.rollout.base import SampledTurn
from dist_ft.rollout.hf import HFGenerator
from dist_ft.rollout.vllm_engine import VLLMGenerator
from dist_ft.wire.batch import Span


class NaiveSampler:
    calls = 0  # generate() calls in this process: proves which engine a run used

    def __init__(self, spec: GeneratorSpec) -> None:
        if spec.top_p != 1.0 or spec.need_ref_logprobs:
            raise ValueError("NaiveSampler samples the full distribution and has no reference")
        self.tokenizer = load_tokenizer(spec.model_path, spec.trust_remote_code)
        self.model = load_policy(
            spec.model_path, spec.dtype, spec.peft, torch.device(spec.device)
        ).eval()
        self.adapter_only = is_adapter(self.model)
        self.max_new_tokens = spec.max_new_tokens
        self.temperature = spec.temperature

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        import_state(self.model, tensors, self.adapter_only)

    def export_weights(self) -> dict[str, torch.Tensor]:
        return export_state(self.model, self.adapter_only)

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int) -> Generation:
        NaiveSampler.calls += 1
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        group_ids = torch.arange(len(prompts)).repeat_interleave(n)  # [N]
        ids = enc["input_ids"][group_ids]  # [N, P]
        mask = enc["attention_mask"][group_ids]  # [N, P]
        p = ids.shape[1]
        done = torch.zeros(len(ids), dtype=torch.bool)  # [N]
        logprobs = []
        for _ in range(self.max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            logp_NV = (logits[:, -1] / self.temperature).float().log_softmax(-1)
            next_N = torch.multinomial(logp_NV.exp(), 1).squeeze(-1)
            next_N = torch.where(done, tok.pad_token_id, next_N)
            chosen = logp_NV.gather(-1, next_N.unsqueeze(-1)).squeeze(-1)
            logprobs.append(torch.where(done, 0.0, chosen))
            ids = torch.cat([ids, next_N.unsqueeze(-1)], dim=1)
            mask = torch.cat([mask, (~done).long().unsqueeze(-1)], dim=1)
            done |= next_N == tok.eos_token_id
        completion_ids = ids[:, p:]
        return Generation(
            prompt_ids=enc["input_ids"],
            prompt_mask=enc["attention_mask"],
            group_ids=group_ids,
            episode_ids=completion_ids,
            episode_mask=(mask[:, p:] * Span.TRAINED).to(torch.int8),
            logprobs=torch.stack(logprobs, dim=1),
            ref_logprobs=None,
            texts=tok.batch_decode(completion_ids, skip_special_tokens=True),
        )


class DriftingLoader(NaiveSampler):
    """NaiveSampler whose weight loads, from the second on, silently round floating tensors
    through bfloat16: the kind of conversion only a read-back of the loaded model catches (the
    bytes it received were right)."""

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        self.loads = 0

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.loads += 1
        if self.loads > 1:
            tensors = {k: v.to(torch.bfloat16).to(v.dtype) for k, v in tensors.items()}
        super().load_weights(tensors)


class NoReadBack(DriftingLoader):
    """An engine that cannot give back the exact bytes it holds (fused or sharded weights), so it
    offers no export_weights; its loads convert like DriftingLoader's, which nothing but a
    read-back could see."""

    export_weights = None  # type: ignore[assignment]  # the optional method, left out


class SlowStart(NaiveSampler):
    """NaiveSampler whose construction takes 10 minutes, as a model load on a swapping node
    can: an actor holding it is placed and stays in its ``__init__``."""

    def __init__(self, spec: GeneratorSpec) -> None:
        time.sleep(600)
        super().__init__(spec)


class Scripted(HFGenerator):
    """The "hf" engine whose multi-turn ``sample`` writes ``Scripted.turns[k]`` (then EOS) as
    every episode's k-th model turn, for tests of what an environment does with a given reply
    (a tool call the random tiny model would never write). Logprob 0: the script is certain."""

    turns: ClassVar[list[str]] = []

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        self.calls = 0

    def sample(self, contexts: list[list[int]], budgets: list[int]) -> list[SampledTurn]:
        text = Scripted.turns[min(self.calls, len(Scripted.turns) - 1)]
        self.calls += 1
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [*ids, self.tokenizer.eos_token_id]
        return [SampledTurn(ids[:b], [0.0] * len(ids[:b])) for b in budgets]


class ConvertingVLLM(VLLMGenerator):
    """The vLLM engine, whose LoRA loads silently round the adapter's first A matrix through
    bfloat16 before vLLM gets it: only a read-back of the engine's layers can see it."""

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        first = min(k for k in tensors if "lora_A" in k)
        tensors = {**tensors, first: tensors[first].to(torch.bfloat16).to(torch.float32)}
        super().load_weights(tensors)


class DroppingVLLM(VLLMGenerator):
    """The vLLM engine, whose full-weight loads silently leave out the first MLP down
    projection: the engine goes on computing with the one it held before."""

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        dropped = min(k for k in tensors if "down_proj" in k)
        super().load_weights({k: v for k, v in tensors.items() if k != dropped})
