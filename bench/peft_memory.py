"""What each ``peft.method`` costs a learner: trainable parameters, bytes per weight sync and
the memory of one training step (CPU, ZeRO-0, fp32, one SFT step on a fixed random batch).

Each method runs in a fresh child process, so no allocator cache or import carries over from
one method to the next. Per method:

- loaded: the child's RSS once the ``Learner`` is built and its weights paged in (interpreter,
  torch, DeepSpeed and the policy). Methods that add weights (bitfit, adapter) show them here.
- step: the peak RSS during the first optimizer step minus ``loaded``: gradients, AdamW's two
  moments (allocated at the first step) and activations. This is where methods differ.
- train: ``loaded`` + ``step``, the peak once the model is loaded: the CPU counterpart of a
  CUDA peak, which never sees the checkpoint that loading reads on the host.
- peak: the child's peak RSS over its whole life (``os.wait4``'s ``ru_maxrss``), loading
  included (bitsandbytes quantises on CPU from the whole fp32 checkpoint, paged in).

The last line gives each method's train peak as a share of full fine-tuning's (``none``).

    python bench/peft_memory.py [--model tiny|smollm2|DIR] [--methods lora,none] [--samples 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dist_ft.model.spec import PeftMethod

MiB = 1024 * 1024


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since start or the last reset) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(method: str, model: str, samples: int, tokens: int) -> dict[str, float]:
    """In the child: build a learner for ``method``, take one SFT step, report the figures."""
    import torch

    from dist_ft.config import load_config
    from dist_ft.learner import Learner
    from dist_ft.model.loading import resolve_model_path
    from dist_ft.run.specs import component_specs
    from dist_ft.wire.batch import ScoredBatch

    overrides = [
        "run.wandb=disabled",
        "resources.device=cpu",
        f"peft.method={method}",
        "learner.lr=auto",
        "algo.objective=sft",
        f"algo.prompts_per_step={samples}",  # SFT: one sample per prompt
    ]
    cfg = load_config(None, overrides)
    if model == "tiny":
        path = resolve_model_path("tiny", cfg.model.tiny)
    elif Path(model).is_dir():  # e.g. sync_seconds.py's 0.5B-shaped model
        path = model
    else:
        from dist_ft.recipes.fetch_model import real_model_path

        path = str(real_model_path(model))
    _, spec = component_specs(cfg, path)
    learner = Learner(spec)
    # fp32 safetensors load as mmap views: page every weight in, or the step's first forward
    # would (and the model's own bytes would count as the step's)
    with torch.no_grad():
        for t in [*learner.module.parameters(), *learner.module.buffers()]:
            if t.device.type == "cpu" and t.numel():
                t.sum()
    loaded = rss_kib("VmRSS")
    vocab = learner.module.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompt_NP = torch.randint(0, vocab, (samples, tokens // 2), generator=g)
    target_NT = torch.randint(0, vocab, (samples, tokens - tokens // 2), generator=g)
    batch = ScoredBatch.supervised(
        prompt_NP, torch.ones_like(prompt_NP), target_NT, torch.ones_like(target_NT)
    )
    resettable = reset_peak()
    learner.step(batch, "sft")
    step_peak = rss_kib("VmHWM") if resettable else None
    trainable = sum(p.numel() for p in learner.module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in learner.module.parameters())
    return {
        "trainable": trainable,
        "total": total,
        "sync_bytes": sum(t.nbytes for t in learner.export_weights().values()),
        "loaded_kib": loaded,
        "step_peak_kib": step_peak,
    }


def run_child(method: str, args: argparse.Namespace) -> dict[str, float]:
    """One method in a fresh process; its peak RSS from the kernel's accounting of that child."""
    cmd = [sys.executable, __file__, "--child", method, "--model", args.model]
    cmd += ["--samples", str(args.samples), "--tokens", str(args.tokens)]
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        out = child.stdout.read()  # to EOF before reaping: wait4 needs the unreaped child
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{method} failed:\n{err.read().decode()[-3000:]}")
    figures = json.loads(out.strip().splitlines()[-1])
    figures["peak_kib"] = usage.ru_maxrss  # KiB on Linux
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2, or a local HF directory")
    parser.add_argument("--methods", default=",".join(m.value for m in PeftMethod))
    parser.add_argument("--samples", type=int, default=8, help="sequences in the step's batch")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence (half prompt)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.samples, args.tokens)))
        return

    methods = [PeftMethod(m).value for m in args.methods.split(",")]
    print(
        f"model={args.model}: one SFT step of {args.samples} x {args.tokens} tokens, fp32, "
        "ZeRO-0, CPU, learner.lr=auto; RSS in MiB, one fresh process per method"
    )
    print(
        f"{'method':8} {'trainable':>12} {'% params':>9} {'bytes/sync':>13} "
        f"{'loaded':>8} {'step':>8} {'train':>8} {'peak':>8}"
    )
    train = {}
    for method in methods:
        f = run_child(method, args)
        step = peak = "n/a"  # where /proc/self/clear_refs cannot reset the peak
        if f["step_peak_kib"] is not None:
            step = f"{(f['step_peak_kib'] - f['loaded_kib']) * 1024 / MiB:+.1f}"
            train[method] = f["step_peak_kib"] * 1024 / MiB
            peak = f"{train[method]:.1f}"
        print(
            f"{method:8} {f['trainable']:>12,} {100 * f['trainable'] / f['total']:>8.3f}% "
            f"{f['sync_bytes']:>13,} {f['loaded_kib'] * 1024 / MiB:>8.1f} {step:>8} "
            f"{peak:>8} {f['peak_kib'] * 1024 / MiB:>8.1f}",
            flush=True,
        )
    if "none" in train:
        shares = ", ".join(
            f"{m} {100 * v / train['none']:.0f}%" for m, v in train.items() if m != "none"
        )
        print(f"train peak as a share of full fine-tuning's: {shares}")


if __name__ == "__main__":
    main()
