"""The two rollout engines side by side: ``rollout.generator=hf`` (transformers generate in the
worker's process) against ``rollout.generator=vllm`` (a vLLM engine in a child process), on the
same model, prompts, LoRA and lengths. Runs are interleaved (hf vllm, vllm hf, ...), each in a
fresh process, so both see the same machine state.

Each run reports:

- load: seconds to build the rollout worker (model load; for vLLM, the engine's start);
- generate-only: samples/s and tokens/s of ``generate`` over B prompts x G samples with the
  learner's initial weights synced in (for LoRA an adapter loaded), the median of ``--reps``
  calls after one warm-up;
- GRPO step: seconds per step of a real ``dist-ft train`` run in debug mode (generate, score,
  learner step, weight sync into the engine with its read-back), the median of steps 2..;
- peak RSS of the generate-only phase: the worker's process, plus for vLLM its engine process.

    python bench/engines.py [--model smollm2|tiny|DIR] [--runs 3] [--shapes 4x16,16x128]

``--shapes`` lists G x max_new_tokens settings (B = ``--prompts``). Prints one line per run, then
a markdown table of medians with the vllm / hf ratios. Needs ``make vllm-env`` (and for smollm2,
``dist-ft fetch-model smollm2``). On a GPU machine: ``--device cuda`` with vllm installed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("hf", "vllm")


def overrides(args: argparse.Namespace, engine: str, group: int, tokens: int) -> list[str]:
    """The run's config: the demo task's prompts, LoRA (the default), fp32."""
    return [
        f"model.path={args.model}",
        f"rollout.generator={engine}",
        f"rollout.group_size={group}",
        f"rollout.max_new_tokens={tokens}",
        f"algo.prompts_per_step={args.prompts}",
        f"resources.device={args.device}",
        "data.max_prompt_tokens=64",
        "grpo.sft_warmup_steps=0",
        "run.wandb=disabled",
        "run.plot=false",
        "run.log_samples=0",
        *args.extra,
    ]


def peak_rss_gib() -> float:
    """This process's peak RSS plus its waited-for children's (the vLLM engine, once closed)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 2**20  # KiB on Linux


def child(args: argparse.Namespace, engine: str, group: int, tokens: int) -> dict[str, Any]:
    """One run of one engine, in this (fresh) process."""
    from dist_ft.config import load_config
    from dist_ft.data import demo_rows, render
    from dist_ft.model.loading import load_policy, load_tokenizer, resolve_model_path
    from dist_ft.model.weights import export_state
    from dist_ft.recipes.fetch_model import MODELS, real_model_path
    from dist_ft.recipes.grpo import train
    from dist_ft.rollout import RolloutWorker
    from dist_ft.run.specs import component_specs

    if args.model in MODELS:
        args.model = str(real_model_path(args.model))
    cfg = load_config(None, overrides(args, engine, group, tokens))
    path = resolve_model_path(cfg.model.path, cfg.model.tiny)
    tokenizer = load_tokenizer(path)
    prompts = [
        render(tokenizer, r["prompt"], "plain", "{prompt}") for r in demo_rows(args.prompts, seed=0)
    ]
    # ---- load and generate-only
    torch.manual_seed(0)
    t0 = time.perf_counter()
    spec = component_specs(cfg, path)[0]
    worker = RolloutWorker(spec)
    load_s = time.perf_counter() - t0
    # generate as the loop does, with the learner's weights synced in: for LoRA the engines
    # decode with an adapter loaded (hf through merged weights, vLLM through its LoRA kernels)
    gen = spec.generation
    learner_side = load_policy(path, gen.dtype, gen.peft, torch.device(gen.device))
    worker.generator.load_weights(export_state(learner_side, gen.peft.method.value != "none"))
    del learner_side
    worker.generator.generate(prompts, group)  # warm-up
    seconds, counts = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = worker.generator.generate(prompts, group)
        seconds.append(time.perf_counter() - t0)
        counts.append(int((out.episode_mask > 0).sum()))
    worker.close()
    rss = peak_rss_gib()
    gen_s = statistics.median(seconds)
    # ---- GRPO steps through the whole loop
    with tempfile.TemporaryDirectory() as out_dir:
        steps = 1 + args.steps
        train(load_config(None, [*overrides(args, engine, group, tokens), f"run.steps={steps}",
                                 f"run.output_dir={out_dir}"]))  # fmt: skip
        rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    parts = ("rollout_seconds", "train_seconds", "sync_seconds")
    step_s = statistics.median(sum(r[k] for k in parts) for r in rows[1:])
    return {
        "engine": engine,
        "G": group,
        "T": tokens,
        "load_s": load_s,
        "samples_per_s": args.prompts * group / gen_s,
        "tokens_per_s": statistics.median(counts) / gen_s,
        "step_s": step_s,
        "peak_rss_gib": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a local HF dir")
    parser.add_argument("--runs", type=int, default=3, help="runs of each engine, interleaved")
    parser.add_argument("--prompts", type=int, default=4, help="B prompts per call and step")
    parser.add_argument("--shapes", default="4x16,16x128", help="G x max_new_tokens, ...")
    parser.add_argument("--reps", type=int, default=3, help="timed generate calls per run")
    parser.add_argument("--steps", type=int, default=2, help="timed GRPO steps per run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "G", "T"), help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="a.b=c overrides for both engines")
    args = parser.parse_args()
    if args.child:
        engine, group, tokens = args.child[0], int(args.child[1]), int(args.child[2])
        print("RESULT " + json.dumps(child(args, engine, group, tokens)), flush=True)
        return

    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    results: list[dict[str, Any]] = []
    for group, tokens in shapes:
        for run in range(args.runs):
            order = ENGINES if run % 2 == 0 else ENGINES[::-1]
            for engine in order:
                cmd = [sys.executable, __file__, "--child", engine, str(group), str(tokens),
                       "--model", args.model, "--prompts", str(args.prompts), "--reps",
                       str(args.reps), "--steps", str(args.steps), "--device", args.device,
                       *args.extra]  # fmt: skip
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode or not lines:
                    sys.exit(f"{engine} G={group} T={tokens} failed:\n{r.stderr[-3000:]}")
                res = json.loads(lines[-1].removeprefix("RESULT "))
                results.append(res)
                print(
                    f"G={group:3d} T={tokens:4d} {engine:5s} run {run}: "
                    f"load {res['load_s']:5.1f} s, {res['samples_per_s']:7.2f} samples/s, "
                    f"{res['tokens_per_s']:8.1f} tokens/s, GRPO step {res['step_s']:6.2f} s, "
                    f"peak RSS {res['peak_rss_gib']:.2f} GiB",
                    flush=True,
                )
    table = render_table(results, shapes, args)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


def render_table(
    results: list[dict[str, Any]], shapes: list[tuple[int, int]], args: argparse.Namespace
) -> str:
    keys = ("load_s", "samples_per_s", "tokens_per_s", "step_s", "peak_rss_gib")
    lines = [
        f"model {args.model}, B={args.prompts} prompts, LoRA r=16, fp32, {args.device}; medians "
        f"of {args.runs} interleaved runs",
        "",
        "| G x tokens | engine | load s | samples/s | tokens/s | GRPO step s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, tokens in shapes:
        med = {
            e: {
                k: statistics.median(
                    r[k] for r in results if (r["engine"], r["G"], r["T"]) == (e, group, tokens)
                )
                for k in keys
            }
            for e in ENGINES
        }
        for e in ENGINES:
            m = med[e]
            lines.append(
                f"| {group} x {tokens} | {e} | {m['load_s']:.1f} | {m['samples_per_s']:.2f} | "
                f"{m['tokens_per_s']:.1f} | {m['step_s']:.2f} | {m['peak_rss_gib']:.2f} |"
            )
        ratio = {k: med["vllm"][k] / med["hf"][k] for k in keys}
        lines.append(
            f"| {group} x {tokens} | vllm / hf | {ratio['load_s']:.2f}x | "
            f"{ratio['samples_per_s']:.2f}x | {ratio['tokens_per_s']:.2f}x | "
            f"{ratio['step_s']:.2f}x | {ratio['peak_rss_gib']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
