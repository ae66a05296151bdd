"""TRL's GRPOTrainer vs dist_ft's debug mode: samples/s, phases, peak RSS, fraction of peak.

Both train the same model on the same rows with the same reward (bench/peer_reward.py, a user
``module:function`` reward on both sides) and the same step: B=4 prompts x G=4, 16 new tokens,
LoRA r=8 alpha=16 on every linear layer, beta 0, fp32, 2 torch threads. Every value but the
model comes from bench/peer_trl.yaml, which dist_ft trains from; TRL's GRPOConfig is derived
from the same loaded config. Each run is a fresh subprocess (peak RSS per framework, from the
kernel's rusage of that child), the frameworks alternate run by run (ABBA: a drift in machine
load falls on both), and the first ``--warmup`` steps of every run are not timed. A step's time
is the wall time from the end of one step to the end of the next, for both frameworks.

Prompts (``--prompts``): ``chat``, the demo rows under the model's chat template (~33 tokens on
SmolLM2), or ``plain``, the same rows as ``PLAIN`` renders them (~9 tokens), TRL given the rendered
text.

FLOPs per sample, for the fraction of peak: what each framework computes for a sample, from its
own algorithm (bench/flops.py: each group's prompt once in dist_ft, every sample's own copy in
TRL; the backward of what trains), at the mean prompt and completion lengths. The peak is this
machine's fp32 matmul rate, measured here with the same thread count.

    python bench/peer_trl.py [--model tiny|smollm2|DIR] [--prompts chat|plain] [--runs 3]
        [--steps 12] [--out F.md]
        [--set resources.mode=ray --set resources.rollout_workers=2 ...]   (dist_ft alone)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from flops import Shape, Step, dist_ft_flops, fraction_of_peak, trl_flops

HERE = Path(__file__).resolve().parent
YAML = HERE / "peer_trl.yaml"
FRAMEWORKS = ("trl", "dist_ft")
PHASES = ("rollout_seconds", "train_seconds", "sync_seconds")  # dist_ft's metrics.jsonl
PLAIN = "User: {prompt}\nAssistant:"  # --prompts plain: data.plain_template, both frameworks
PROMPTS = {
    "chat": ["data.template=chat"],
    # a YAML double-quoted value: the override parser would read "User: ..." as a mapping
    "plain": ["data.template=plain", "data.plain_template=" + json.dumps(PLAIN)],
}
FLOPS = {"trl": trl_flops, "dist_ft": dist_ft_flops}  # FLOPs per sample (bench/flops.py)


# ------------------------------------------------------------------------- child processes


def load(spec: dict[str, Any]) -> Any:
    from dist_ft.config import load_config

    return load_config(YAML, spec["overrides"])


def child_dist_ft(spec: dict[str, Any]) -> dict[str, Any]:
    """dist_ft through its public entry, ``train(cfg)``; the times come from its metrics.jsonl."""
    from dist_ft.recipes.grpo import train

    cfg = load(spec)
    train(cfg)
    rows = [json.loads(line) for line in Path(spec["metrics"]).read_text().splitlines()]
    return {
        "stamps": [r["time"] for r in rows],  # seconds since the tracker started, per step end
        "completion_tokens": [r["completion_tokens"] for r in rows],
        **{k: [r[k] for r in rows] for k in PHASES},
    }


def child_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's GRPOTrainer with the same settings; a callback stamps the end of every step."""
    import torch
    from datasets import Dataset
    from peer_reward import trl_char_share
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dist_ft.data import load_rows
    from dist_ft.model.peft import lora_config

    cfg = load(spec)
    rows = load_rows(cfg.data.source, cfg.data.demo_size, cfg.run.seed)  # dist_ft's rows
    if cfg.data.template == "chat":  # TRL applies the template
        prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    else:  # plain text TRL passes through as it is
        prompts = [cfg.data.plain_template.format(prompt=r["prompt"]) for r in rows]
    data = Dataset.from_list([{"prompt": c, "answer": r["answer"]} for c, r in zip(prompts, rows)])
    stamps: list[float] = []  # perf_counter at the end of every optimizer step
    lengths: list[float] = []  # mean completion tokens of every step, as TRL logs them

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    g = cfg.rollout.group_size
    args = GRPOConfig(
        output_dir=spec["output_dir"],
        use_cpu=True,
        bf16=False,
        fp16=False,
        model_init_kwargs={"dtype": getattr(torch, cfg.model.dtype)},
        per_device_train_batch_size=cfg.samples_per_step,  # completions, not prompts: B x G
        gradient_accumulation_steps=1,
        num_generations=g,
        max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        beta=cfg.grpo.beta,
        loss_type=cfg.grpo.loss.value,
        epsilon=cfg.grpo.eps_low,
        epsilon_high=cfg.grpo.eps_high,
        learning_rate=cfg.learner.lr,
        weight_decay=cfg.learner.weight_decay,
        max_grad_norm=cfg.learner.grad_clip,
        lr_scheduler_type="constant",
        max_steps=cfg.run.steps,
        seed=cfg.run.seed,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=spec["model_path"],
        reward_funcs=trl_char_share,
        args=args,
        train_dataset=data,
        peft_config=lora_config(cfg.peft),  # dist_ft's own LoraConfig for the same settings
        callbacks=[Clock()],
    )
    t0 = time.perf_counter()
    trainer.train()
    return {"stamps": [t - t0 for t in stamps], "completion_tokens": lengths}


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    out = child_trl(spec) if spec["framework"] == "trl" else child_dist_ft(spec)
    Path(spec["result"]).write_text(json.dumps(out))


# ------------------------------------------------------------------------- the parent


def matmul_gflops(threads: int, n: int = 1024, seconds: float = 1.0) -> float:
    """Best of three rounds of fp32 n x n matmuls on ``threads`` threads: 2 n^3 FLOP each."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # first call: allocation and kernel choice
    best = 0.0
    for _ in range(3):
        k, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds / 3 or k == 0:
            a @ b
            k += 1
        best = max(best, 2 * n**3 * k / elapsed / 1e9)
    return best


def run_child(
    framework: str, index: int, model_path: str, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """One run in a fresh process; its result, wall time and peak RSS (the child's rusage)."""
    out = work / f"{framework}-{index}"
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "framework": framework,
        "threads": args.threads,
        "model_path": model_path,
        "output_dir": str(out),
        "metrics": str(out / "metrics.jsonl"),
        "result": str(out / "result.json"),
        "overrides": [
            f"model.path={model_path}",
            f"run.steps={args.steps}",
            f"run.seed={index}",  # each run its own samples; both frameworks the same seed
            f"run.output_dir={out}",
            *PROMPTS[args.prompts],
            # --set: dist_ft alone (e.g. its Ray mode); TRL reads only the shared values
            *(args.set if framework == "dist_ft" else []),
        ],
    }
    (out / "spec.json").write_text(json.dumps(spec, indent=1))
    (out / "result.json").unlink(missing_ok=True)
    # Each run is a single process of its own: a torch.distributed rendezvous left in this
    # environment (a learner started earlier in the calling process sets MASTER_PORT) would make
    # accelerate, inside TRL, try to listen on a port that process still holds.
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {
        **{k: v for k, v in os.environ.items() if k not in rendezvous},
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(out / "spec.json")]
    t0 = time.perf_counter()
    with (out / "log.txt").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE)
        timer = threading.Timer(args.timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (out / "log.txt").read_text()[-3000:]
        sys.exit(f"{framework} run {index} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads((out / "result.json").read_text())
    stamps = result["stamps"]
    if len(stamps) != args.steps:
        sys.exit(f"{framework} run {index}: {len(stamps)} step times for {args.steps} steps")
    timed = args.steps - args.warmup
    elapsed = stamps[-1] - stamps[args.warmup - 1]  # end of the last warm-up step to the end
    row = {
        "framework": framework,
        "run": index,
        "samples_per_s": timed * args.samples_per_step / elapsed,
        "s_per_step": elapsed / timed,
        "completion_tokens": statistics.fmean(result["completion_tokens"][args.warmup :]),
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "wall_s": wall,
    }
    for k in PHASES:
        if k in result:
            row[k] = statistics.fmean(result[k][args.warmup :])
    print(
        f"  {framework:7s} run {index}: {row['samples_per_s']:8.2f} samples/s  "
        f"{row['s_per_step']:.3f} s/step  peak RSS {row['peak_rss_mb']:,.0f} MB  "
        f"({wall:.0f} s in all)",
        flush=True,
    )
    return row


def model_shape(model_path: str, cfg: Any) -> tuple[Shape, float]:
    """The policy's weight counts (built on the meta device with the config's PEFT method, no
    weights read) and P, the mean prompt tokens of the rows as the config renders them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_ft.data import load_rows, render
    from dist_ft.model.loading import load_tokenizer
    from dist_ft.model.peft import apply_method

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    head = model.get_output_embeddings().weight
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    model = apply_method(model, cfg.peft)
    adapted = [m.base_layer.weight for m in model.modules() if hasattr(m, "lora_A")]
    shape = Shape(
        body=sum(w.numel() for w in linear if w is not head),
        head=head.numel(),
        adapter=sum(p.numel() for p in model.parameters() if p.requires_grad),
        adapted=sum(w.numel() for w in adapted),
        rank=cfg.peft.r,
    )
    tok = load_tokenizer(model_path)
    rows = load_rows(cfg.data.source, cfg.data.demo_size, cfg.run.seed)
    texts = [render(tok, r["prompt"], cfg.data.template, cfg.data.plain_template) for r in rows]
    p = statistics.fmean(len(tok(t, add_special_tokens=False).input_ids) for t in texts)
    return shape, p


def spread(values: list[float], fmt: str = ".2f") -> str:
    mid = statistics.median(values)
    if len(values) == 1:
        return f"{mid:{fmt}}"
    return f"{mid:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def report(rows: list[dict[str, Any]], args: argparse.Namespace, shape: Shape, peak: float) -> str:
    by = {fw: [r for r in rows if r["framework"] == fw] for fw in FRAMEWORKS}
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ("trl", "transformers", "peft", "torch")
    )
    load = " -> ".join(f"{x:.1f}" for x in args.load)
    mode = ", ".join(args.set) if args.set else "debug mode"
    lines = [
        f"# TRL GRPOTrainer vs dist_ft ({mode}), model `{args.model}`, {args.prompts} prompts",
        "",
        f"{args.settings}, {args.threads} torch threads; {args.runs} run(s) per framework, "
        f"interleaved (ABBA), {args.steps} steps per run of which {args.warmup} warm-up steps "
        f"are not timed. {versions}. Median over runs (min-max). Load average (1 min) before "
        f"-> after: {load} on {os.cpu_count()} cores; other processes share them.",
        "",
        "| framework | samples/s | s/step | completion tokens | peak RSS (MB) | GFLOP/sample "
        "| GFLOP/s | of peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fw, rs in by.items():
        sps = [r["samples_per_s"] for r in rs]
        tokens = statistics.fmean(r["completion_tokens"] for r in rs)
        # each run at its own mean completion length
        steps = [replace(args.step, completion_tokens=r["completion_tokens"]) for r in rs]
        per_sample = [FLOPS[fw](shape, step) for step in steps]
        rates = [f * x for f, x in zip(per_sample, sps)]
        shares = [fraction_of_peak(f, x, peak * 1e9) for f, x in zip(per_sample, sps)]
        lines.append(
            f"| {fw} | {spread(sps)} | {spread([r['s_per_step'] for r in rs], '.3f')} "
            f"| {tokens:.1f} | {spread([r['peak_rss_mb'] for r in rs], ',.0f')} "
            f"| {statistics.fmean(per_sample) / 1e9:.2f} "
            f"| {spread([f / 1e9 for f in rates], '.2f')} "
            f"| {spread([100 * x for x in shares], '.1f')}% |"
        )
    ratios = [
        d["samples_per_s"] / t["samples_per_s"]
        for t, d in zip(by["trl"], by["dist_ft"])  # pairs of the same run index
    ]
    phase_means = {k: statistics.fmean(r[k] for r in by["dist_ft"]) for k in PHASES}
    step = statistics.fmean(r["s_per_step"] for r in by["dist_ft"])
    other = step - sum(phase_means.values())
    split = ", ".join(
        f"{k.removesuffix('_seconds')} {v:.3f} s ({100 * v / step:.0f}%)"
        for k, v in [*phase_means.items(), ("other_seconds", other)]
    )
    lines += [
        "",
        f"- dist_ft / TRL samples/s: **{spread(ratios)}x** over {len(ratios)} run pairs",
        f"- dist_ft per step ({step:.3f} s, from its metrics.jsonl): {split}",
        f"- peak fp32 matmul, 1024x1024, {args.threads} threads: {peak:.1f} GFLOP/s "
        f"(best of a measurement before and after the runs)",
        f"- FLOPs per sample: what each framework computes (bench/flops.py): "
        f"{shape.body / 1e6:.2f}M weights below the output layer, {shape.head / 1e6:.2f}M in it, "
        f"{shape.adapter / 1e6:.2f}M LoRA weights; P = {args.step.prompt_tokens:.1f} prompt tokens "
        f"({args.prompts}), T = the completion tokens above",
        "",
        "| run | framework | samples/s | s/step | peak RSS (MB) | process wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['framework']} | {r['samples_per_s']:.2f} | "
            f"{r['s_per_step']:.3f} | {r['peak_rss_mb']:,.0f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    panels = [("samples_per_s", "samples/s"), ("peak_rss_mb", "peak RSS (MB)")]
    for ax, (key, label) in zip(axes, panels):
        for x, fw in enumerate(FRAMEWORKS):
            values = [r[key] for r in rows if r["framework"] == fw]
            ax.bar(x, statistics.median(values), color=f"C{x}", alpha=0.6)
            ax.scatter([x] * len(values), values, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(FRAMEWORKS)), FRAMEWORKS)
        ax.set_ylabel(f"{label} (median; dots: runs)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2, or a local HF directory")
    parser.add_argument(
        "--prompts", choices=sorted(PROMPTS), default="chat", help="the prompts' format"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per framework")
    parser.add_argument("--steps", type=int, default=12, help="steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of a run not timed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--out", type=Path, help="write the markdown table here (+ a .png)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for dist_ft's runs only, e.g. resources.mode=ray (repeatable)",
    )
    parser.add_argument("--workdir", type=Path, help="run outputs (default runs/bench-peer/M)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a run's spec.json
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    if not 1 <= args.warmup < args.steps:
        parser.error("need 1 <= --warmup < --steps: a timed window starts at a step's end")

    from dist_ft.config import load_config
    from dist_ft.model.loading import resolve_model_path
    from dist_ft.recipes.fetch_model import MODELS, real_model_path

    cfg = load_config(YAML, PROMPTS[args.prompts])
    args.samples_per_step = cfg.samples_per_step
    p = cfg.peft
    args.settings = (
        f"B={cfg.algo.prompts_per_step} prompts x G={cfg.rollout.group_size} = "
        f"{cfg.samples_per_step} samples/step, {cfg.rollout.max_new_tokens} new tokens, "
        f"{p.method.value} r={p.r} alpha={p.alpha} {p.target_modules}, beta {cfg.grpo.beta:g}, "
        f"{cfg.model.dtype}, loss {cfg.grpo.loss.value}"
    )
    args.load = [os.getloadavg()[0]]
    if args.model in MODELS:
        model_path = str(real_model_path(args.model))
    else:  # "tiny" (the same directory dist_ft's model.path=tiny resolves to) or a directory
        model_path = resolve_model_path(args.model, cfg.model.tiny, "--model")
    work = (args.workdir or Path("runs") / "bench-peer" / Path(args.model).name).resolve()
    shape, prompt_tokens = model_shape(model_path, cfg)
    args.step = Step(
        prompt_tokens=prompt_tokens,
        completion_tokens=0.0,  # each run's own mean
        group_size=cfg.rollout.group_size,
        samples=cfg.samples_per_step,
        merged_decode=cfg.rollout.merge_lora,
    )
    peak = matmul_gflops(args.threads)
    print(f"model {args.model} ({model_path}), fp32 matmul peak {peak:.1f} GFLOP/s", flush=True)

    rows = []
    for i in range(args.runs):
        order = FRAMEWORKS if i % 2 == 0 else FRAMEWORKS[::-1]
        rows += [run_child(fw, i, model_path, args, work) for fw in order]
    peak = max(peak, matmul_gflops(args.threads))
    args.load.append(os.getloadavg()[0])

    text = report(rows, args, shape, peak)
    print("\n" + text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        title = (
            f"GRPO on {args.model}, {args.prompts} prompts, {args.samples_per_step} samples/step"
        )
        png = plot(rows, args.out.with_suffix(".png"), title)
        print(f"\nwritten: {args.out}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
