"""Payload bytes per sample of a real rollout (the demo config: tiny model, B=8 prompts x G=8,
8 new tokens, 2 reward functions) against the information minimum.

The minimum is what a sample cannot do without, at its real (unpadded) lengths: int32 ids for
its prompt and completion tokens, a float32 behaviour logprob per completion token and a float32
reward per function. Everything above it is padding, masks, group ids, sample ids, versions,
advantages and flags. The figure is printed, not asserted.

    python bench/payload_bytes.py
"""

from __future__ import annotations

from pathlib import Path

from dist_ft.config import load_config
from dist_ft.model.loading import load_tokenizer, resolve_model_path
from dist_ft.rollout import RolloutWorker
from dist_ft.run.samplers import load_prompts
from dist_ft.run.specs import component_specs

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main() -> None:
    cfg = load_config(DEMO, ["run.wandb=disabled"])
    path = resolve_model_path(cfg.model.path, cfg.model.tiny)
    prompts = load_prompts(cfg, load_tokenizer(path)).prompts[: cfg.algo.prompts_per_step]
    rollout, _ = component_specs(cfg, path)
    batch = RolloutWorker(rollout).rollout(1, prompts, seed=0)

    n, k = len(batch), len(batch.reward_names)
    prompt_tokens = int(batch.sample_prompts()[1].sum())  # summed over samples
    completion_tokens = batch.num_tokens
    # int32 ids (prompt + completion), float32 logprob per completion token, float32 rewards
    minimum = (4 * (prompt_tokens + completion_tokens) + 4 * completion_tokens + 4 * k * n) / n
    per_sample = batch.nbytes / n
    bound = batch.bytes_per_sample(
        batch.prompt_ids.shape[1],
        batch.episode_ids.shape[1],
        k,
        ref=False,
        group_size=cfg.rollout.group_size,
    )
    print(
        f"tiny model, B={len(prompts)} x G={cfg.rollout.group_size}, "
        f"{cfg.rollout.max_new_tokens} new tokens, K={k} reward functions"
    )
    print(
        f"mean tokens per sample: prompt {prompt_tokens / n:.1f}, completion "
        f"{completion_tokens / n:.1f}"
    )
    for name, t in batch.to_tensors("").items():
        print(f"  {name:14} {tuple(t.shape)!s:10} {t.dtype!s:14} {t.nbytes / n:7.2f} B/sample")
    print(f"payload: {per_sample:.1f} B/sample (plan bound {bound} B)")
    print(f"minimum: {minimum:.1f} B/sample")
    print(f"ratio:   {per_sample / minimum:.2f}x")


if __name__ == "__main__":
    main()
