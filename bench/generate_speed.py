"""Seconds per ``HFGenerator.generate`` call, this tree against another revision, interleaved.

The other revision's ``dist_ft/rollout/hf.py`` is read with ``git show REV:...`` and imported
beside this tree's, so both run in one process on the same weights and prompts, in alternating
order (A B, B A, ...), each call seeded alike. Reported: median, min and max wall and process
CPU seconds, the completion width T each returned, and ``os.getloadavg()``. On a shared machine
CPU seconds are the steadier figure, and ``--threads 1`` avoids the OpenMP barrier stalls that
make 2-thread wall times swing 100x when the cores are oversubscribed.

Settings follow bench/peer_trl.yaml: LoRA r=8 (alpha 16) on every linear layer, fp32, B=4 chat
prompts of the demo task x G=4 samples, 16 new tokens, temperature 1.

    python bench/generate_speed.py [--model tiny|smollm2|DIR] [--against HEAD] [--reps 6]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dist_ft.config import load_config
from dist_ft.data import demo_rows, render
from dist_ft.model.loading import resolve_model_path
from dist_ft.model.spec import PeftSpec
from dist_ft.recipes.fetch_model import MODELS, real_model_path
from dist_ft.rollout.base import GeneratorSpec
from dist_ft.rollout.hf import HFGenerator

ROOT = Path(__file__).resolve().parents[1]
B, G = 4, 4


def generator_at(rev: str, spec: GeneratorSpec) -> Any:
    """``HFGenerator`` as ``dist_ft/rollout/hf.py`` was at git revision ``rev``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:dist_ft/rollout/hf.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    module_spec = importlib.util.spec_from_file_location(f"hf_at_{rev}", f.name)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    finally:
        os.unlink(f.name)
    return module.HFGenerator(spec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", help="tiny, smollm2, or a local HF directory")
    parser.add_argument("--against", default="HEAD", help="git revision of the baseline hf.py")
    parser.add_argument("--reps", type=int, default=6, help="timed calls per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, ["run.wandb=disabled"])
    if args.model in MODELS:
        path = str(real_model_path(args.model))
    else:
        path = resolve_model_path(args.model, cfg.model.tiny, "--model")
    spec = GeneratorSpec(
        path, "float32", PeftSpec(r=8, alpha=16), "cpu", args.max_new_tokens, 1.0, 1.0, False
    )
    sides = {"this tree": HFGenerator(spec), args.against: generator_at(args.against, spec)}
    rows = demo_rows(B * (args.reps + 1), seed=1)
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    width: dict[str, list[int]] = {k: [] for k in sides}
    tok = sides["this tree"].tokenizer
    for rep in range(args.reps + 1):  # rep 0 warms both up, untimed
        prompts = [
            render(tok, r["prompt"], "chat", "{prompt}") for r in rows[B * rep : B * rep + B]
        ]
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
        for name in order:
            torch.manual_seed(rep)
            c0, t0 = time.process_time(), time.perf_counter()
            out = sides[name].generate(prompts, G)
            if rep:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                width[name].append(out.episode_ids.shape[1])
    print(
        f"{args.model}: B={B} x G={G}, {args.max_new_tokens} new tokens, {args.threads} "
        f"thread(s), {args.reps} calls per side; load average {os.getloadavg()}"
    )
    base_wall, base_cpu = (
        statistics.median(wall[args.against]),
        statistics.median(cpu[args.against]),
    )
    for name in sides:
        w, c = wall[name], cpu[name]
        print(
            f"  {name:>10}: wall {statistics.median(w):.3f}s [{min(w):.3f}, {max(w):.3f}] "
            f"({base_wall / statistics.median(w):.2f}x), cpu {statistics.median(c):.3f}s "
            f"[{min(c):.3f}, {max(c):.3f}] ({base_cpu / statistics.median(c):.2f}x), "
            f"T {width[name]}"
        )


if __name__ == "__main__":
    sys.exit(main())
