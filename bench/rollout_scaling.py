"""Rollout throughput (samples/s) with 1 vs 2 rollout actors on a local Ray, same prompts.

Each actor gets one CPU (Ray pins its torch to one thread), so on a 2-core machine two actors
can run side by side; the ratio is the scaling of generation + scoring, learner excluded.

    python bench/rollout_scaling.py [--steps 10]
"""

from __future__ import annotations

import argparse
import time

import ray

from dist_ft.config import load_config
from dist_ft.data import demo_rows
from dist_ft.model.loading import resolve_model_path
from dist_ft.rollout import RolloutSpec, RolloutWorker
from dist_ft.run.specs import component_specs
from dist_ft.wire.prompt import Prompt


def samples_per_second(
    num_actors: int, steps: int, prompts: list[Prompt], spec: RolloutSpec
) -> float:
    # Ray sets OMP_NUM_THREADS to the actor's num_cpus: one thread per actor.
    worker = ray.remote(num_cpus=1)(RolloutWorker)
    actors = [worker.remote(spec, worker_index=i) for i in range(num_actors)]
    share = len(prompts) // num_actors
    ray.get([a.rollout.remote(0, prompts[:share], 0) for a in actors])  # warm-up
    t0 = time.perf_counter()
    batches = ray.get(
        [
            a.rollout.remote(step, prompts[i * share : (i + 1) * share], step)
            for step in range(1, steps + 1)
            for i, a in enumerate(actors)
        ]
    )
    elapsed = time.perf_counter() - t0
    for a in actors:
        ray.kill(a)
    return sum(len(b) for b in batches) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (B)")
    args = parser.parse_args()
    cfg = load_config(None, ["run.wandb=disabled", "rollout.max_new_tokens=32"])
    worker_kwargs, _ = component_specs(cfg, resolve_model_path("tiny", cfg.model.tiny))
    prompts = [Prompt(i, r["prompt"], r["answer"]) for i, r in enumerate(demo_rows(args.prompts))]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        one = samples_per_second(1, args.steps, prompts, worker_kwargs)
        two = samples_per_second(2, args.steps, prompts, worker_kwargs)
    finally:
        ray.shutdown()
    g = cfg.rollout.group_size
    print(f"tiny model, B={args.prompts} x G={g}, {cfg.rollout.max_new_tokens} new tokens")
    print(f"1 rollout actor : {one:8.1f} samples/s")
    print(f"2 rollout actors: {two:8.1f} samples/s  ({two / one:.2f}x)")


if __name__ == "__main__":
    main()
