"""``dist-ft compare RUN_DIR``: what a GRPO run changed, in words and in reward.

The base model and the run's trained policy each answer the run's prompts greedily (so the
comparison does not depend on sampling luck), the run's own reward functions score both, and the
first few prompts are shown side by side. Written to ``RUN_DIR/compare.md`` and printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dist_ft.models import (
    PeftMethod,
    PeftSpec,
    load_policy,
    load_tokenizer,
    resolve_model_path,
)


@dataclass
class Comparison:
    prompts: list[str]  # [M] rendered prompts, in data order
    answers: list[str | None]  # [M] reference answers
    before: list[str]  # [M] the base model's greedy completions
    after: list[str]  # [M] the trained policy's
    reward_before: list[float]  # [M] weighted total reward of each completion
    reward_after: list[float]

    def table(self, show: int) -> str:
        """Markdown: the mean rewards, then the first ``show`` prompts side by side."""

        def cell(text: str | None) -> str:
            return "" if text is None else text.replace("|", "\\|").replace("\n", " ").strip()

        n = len(self.prompts)
        mean_b = sum(self.reward_before) / n
        mean_a = sum(self.reward_after) / n
        lines = [
            f"Mean reward over {n} prompts (greedy): before {mean_b:.3f}, after {mean_a:.3f}",
            "",
            "| prompt | answer | before | reward | after | reward |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for i in range(min(show, n)):
            lines.append(
                f"| {cell(self.prompts[i])} | {cell(self.answers[i])} | {cell(self.before[i])} "
                f"| {self.reward_before[i]:.2f} | {cell(self.after[i])} "
                f"| {self.reward_after[i]:.2f} |"
            )
        return "\n".join(lines) + "\n"


@torch.no_grad()
def greedy(
    model: nn.Module, tokenizer: object, prompts: list[str], max_new_tokens: int, batch: int
) -> list[str]:
    """Greedy completions of ``prompts``, special tokens removed."""
    out: list[str] = []
    for start in range(0, len(prompts), batch):
        enc = tokenizer(  # type: ignore[operator]
            prompts[start : start + batch],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(next(model.parameters()).device)
        ids = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        )
        completions = ids[:, enc["input_ids"].shape[1] :]
        out += tokenizer.batch_decode(completions, skip_special_tokens=True)  # type: ignore[attr-defined]
    return out


def compare_run(run_dir: str | Path, max_prompts: int = 64, batch: int = 16) -> Comparison:
    """Score the base and the trained policy of the finished run in ``run_dir`` on the first
    ``max_prompts`` good rows of its data (0 = all)."""
    from dist_ft.config import ConfigError, load_config
    from dist_ft.peft_methods import load_artefact
    from dist_ft.rewards import RewardSet
    from dist_ft.trainer import component_specs, load_prompts, resolve_device

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run directory: it has no config.yaml")
    cfg = load_config(run / "config.yaml")
    method = cfg.peft.method
    weights = run / ("model" if method is PeftMethod.NONE else "adapter")
    if not weights.is_dir():
        raise FileNotFoundError(f"{run} has no {weights.name}/: the run has not finished")
    base = resolve_model_path(cfg.model.path, cfg.model.tiny)
    tokenizer = load_tokenizer(base, cfg.model.trust_remote_code)
    prompts = load_prompts(cfg, tokenizer).prompts
    prompts = prompts[:max_prompts] if max_prompts else prompts
    texts = [p.text for p in prompts]
    device = torch.device(resolve_device(cfg.resources.device))
    dtype, remote, new = cfg.model.dtype, cfg.model.trust_remote_code, cfg.rollout.max_new_tokens

    no_peft = PeftSpec(method=PeftMethod.NONE)
    model = load_policy(base, dtype, no_peft, device, remote).eval()
    before = greedy(model, tokenizer, texts, new, batch)
    if method is PeftMethod.NONE:
        model = load_policy(str(weights), dtype, no_peft, device, remote).eval()
    else:
        model = load_policy(base, dtype, cfg.peft, device, remote).eval()
        load_artefact(model, weights)
    after = greedy(model, tokenizer, texts, new, batch)

    rollout, _ = component_specs(cfg, base)
    if any(name == "judge" for name, _, _ in rollout.rewards):
        raise ConfigError(
            f"{run}: compare scores with rule and user reward functions; this run's reward "
            "includes the RLAIF judge, which needs its own model (see dist-ft label)",
            keys=("reward.functions",),
        )
    rewards = RewardSet(rollout.rewards, rollout.reward_timeout_s, tasks=rollout.reward_tasks)
    answers = [p.answer for p in prompts]
    tasks = [p.task for p in prompts]

    def totals(completions: list[str]) -> list[float]:
        scores = rewards.score(texts, completions, answers, tasks)
        return scores.total(rewards.weights, fill=0.0).tolist()

    return Comparison(texts, answers, before, after, totals(before), totals(after))
