"""Multi-task: one LoRA adapter on the built-in mixture against each task trained alone
(configs/multitask_demo.yaml; same steps and samples per step, so each task gets half the
mixture's samples). Prints each task's mean reward over the first and last 10 steps.

    python bench/multitask.py [--seeds 0 1 2] [--jobs 2] [--out runs/multitask_bench] [a.b=c ...]

A task trained alone runs on its single-task built-in source (``demo``, ``demo_next``), scored
by the same ``char_match`` as in the mixture.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "multitask_demo.yaml")
DIST_FT = str(Path(sys.executable).with_name("dist-ft"))
ALONE = {"repeat": "demo", "next": "demo_next"}  # task -> its single-task source
# The mixture's rewards without task names: a single-task source's rows are task "default".
ALONE_REWARDS = "reward.functions=[{name: char_match}, {name: exact_match, weight: 0.0}]"


def run(out: Path, overrides: list[str]) -> list[dict]:
    argv = [DIST_FT, "train", CONFIG, f"run.output_dir={out}", "run.overwrite=true", *overrides]
    # one thread per run: parallel runs on a few cores otherwise thrash each other's BLAS pools
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{r.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def first_last(rows: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows if key in r]
    return sum(values[:10]) / 10, sum(values[-10:]) / 10


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--out", default="runs/multitask_bench")
    ap.add_argument("overrides", nargs="*", help="a.b=c for every run (e.g. run.steps=300)")
    args = ap.parse_args()
    out = ROOT / args.out
    jobs = {}  # (run, seed) -> its overrides
    for seed in args.seeds:
        common = [f"run.seed={seed}", "run.wandb=disabled", "run.plot=false", *args.overrides]
        jobs["mixture", seed] = common
        for task, source in ALONE.items():
            jobs[task, seed] = [f"data.source={source}", ALONE_REWARDS, *common]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {k: pool.submit(run, out / f"{k[0]}-seed{k[1]}", v) for k, v in jobs.items()}
        rows = {k: f.result() for k, f in futures.items()}

    print("| task | seed | mixture: first 10 | last 10 | rise | alone: first 10 | last 10 | rise |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for task in ALONE:
        for seed in args.seeds:
            mix = first_last(rows["mixture", seed], f"reward/task/{task}")
            alone = first_last(rows[task, seed], "reward/mean")
            cells = [f"{a:.3f} | {b:.3f} | {b - a:+.3f}" for a, b in (mix, alone)]
            print(f"| {task} | {seed} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
