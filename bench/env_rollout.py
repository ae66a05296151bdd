"""Multi-turn episodes: one rollout worker's episodes/s with every live episode's turn in one
generate call (what dist_ft does), against the same episodes run one at a time by the same
episode loop and engine, interleaved. Generation and environment only (no scoring).

16 concurrent episodes (4 prompts x G=4) in an environment whose episodes last 1 to 4 model
turns (drawn per row, so episodes finish out of order and the batch shrinks as they do); each
turn samples up to ``--turn-tokens`` tokens. Printed per run: episodes/s of each way, their
ratio, and for the batched way the mean batch size of a ``sample`` call against the mean number
of live episodes at that call (the goal: >= 0.8; dist_ft puts every live episode in the call,
and the live count is read from the episodes' own turns, not from the calls).

    python bench/env_rollout.py [--model tiny|smollm2|DIR] [--runs 3] [--turn-tokens 16]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import torch

from dist_ft.config import load_config
from dist_ft.data import demo_rows
from dist_ft.envs import Step
from dist_ft.model.loading import resolve_model_path
from dist_ft.rollout import RolloutWorker
from dist_ft.run.specs import component_specs
from dist_ft.wire.batch import Span
from dist_ft.wire.prompt import Prompt


class Turns:
    """Answers every model turn with a short user message until the row's ``turns`` are done:
    the latency of a real application is left out, so the figure is the engine's."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.prompt, self.turns, self.k = row["prompt"], int(row["turns"]), 0

    def reset(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]

    def step(self, message: str) -> Step:
        self.k += 1
        more = [{"role": "user", "content": f"Go on ({self.k})."}]
        return Step(more, reward=float(len(message) % 3), done=self.k >= self.turns)


def model_turns(mask_NT: torch.Tensor) -> list[int]:
    """Model turns of each episode: its runs of TRAINED tokens."""
    trained_NT = (mask_NT == Span.TRAINED).int()
    starts_NT = trained_NT[:, 1:] > trained_NT[:, :-1]
    return (starts_NT.sum(1) + trained_NT[:, 0]).tolist()


def worker_for(model: str, turn_tokens: int, group: int) -> RolloutWorker:
    cfg = load_config(
        None,
        [
            f"model.path={model}",
            "env.name=env_rollout:Turns",  # this file, imported as a module (bench/ is on sys.path)
            "env.max_turns=4",
            "env.max_episode_tokens=512",
            "reward.functions=[]",
            f"rollout.group_size={group}",
            f"rollout.max_new_tokens={turn_tokens}",
            "run.wandb=disabled",
        ],
    )
    rollout, _ = component_specs(cfg, resolve_model_path(cfg.model.path, cfg.model.tiny))
    return RolloutWorker(rollout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", help="tiny, smollm2, or a local HF directory")
    parser.add_argument("--runs", type=int, default=3, help="runs of each way, interleaved")
    parser.add_argument("--prompts", type=int, default=4, help="B prompts (x G = episodes)")
    parser.add_argument("--group", type=int, default=4, help="G episodes per prompt")
    parser.add_argument("--turn-tokens", type=int, default=16, help="tokens per model turn")
    args = parser.parse_args()

    rng = random.Random(0)
    rows = demo_rows(args.prompts, seed=0)
    prompts = [
        Prompt(i, r["prompt"], r["answer"], row={**r, "turns": rng.randint(1, 4)})
        for i, r in enumerate(rows)
    ]
    worker = worker_for(args.model, args.turn_tokens, args.group)
    runner = worker.episodes  # the worker's episode loop, and its engine, both ways
    assert runner is not None
    calls: list[int] = []  # batch size of each sample call
    sample = worker.generator.sample

    def counted(contexts: list[list[int]], budgets: list[int]) -> Any:
        calls.append(len(contexts))
        return sample(contexts, budgets)

    worker.generator.sample = counted  # type: ignore[method-assign]
    runner.run(prompts, args.group)  # warm-up
    n = args.prompts * args.group
    print(f"{n} episodes ({args.prompts} prompts x G={args.group}), turns per row "
          f"{[p.row['turns'] for p in prompts if p.row]}, {args.turn_tokens} tokens a turn, "
          f"model {args.model}")  # fmt: skip
    ratios = []
    for run in range(args.runs):
        torch.manual_seed(run)
        calls.clear()
        t0 = time.perf_counter()
        generation, _ = runner.run(prompts, args.group)
        together = time.perf_counter() - t0
        batch_calls = list(calls)
        t0 = time.perf_counter()
        for p in prompts:  # the same episodes, one at a time
            for _ in range(args.group):
                runner.run([p], 1)
        apart = time.perf_counter() - t0
        calls[:] = batch_calls
        # live episodes at call k, from the episodes themselves: those with more than k turns
        turns_N = model_turns(generation.episode_mask)
        live = [sum(t > k for t in turns_N) for k in range(len(calls))]
        share = sum(calls) / sum(live)
        ratios.append(apart / together)
        print(f"run {run}: batched {n / together:6.2f} episodes/s, one at a time "
              f"{n / apart:6.2f} episodes/s: {apart / together:.2f}x; sample calls of "
              f"{calls} episodes with {live} live: mean batch {statistics.mean(calls):.2f} = "
              f"{share:.2f} x live episodes")  # fmt: skip
    print(f"batched / one at a time: {statistics.median(ratios):.2f}x (median of {args.runs})")


if __name__ == "__main__":
    main()
