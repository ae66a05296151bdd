"""RLAIF end to end: label with the tiny judge, DPO on the labels, and the judge's mean score of
the policy's samples before and after (configs/rlaif_dpo_demo.yaml; ~10 min on 2 cores).

    python bench/rlaif_dpo.py [--out runs/rlaif_dpo_bench] [--eval-prompts 64]

1. ``dist-ft label`` (run.seed 0): the training pairs.
2. ``dist-ft dpo`` on them (LoRA), then ``dist-ft export --merge``: base + adapter, a model dir.
3. ``dist-ft label`` again with another seed (other prompts and samples) and the same judge, once
   with the initial policy and once with the DPO policy: ``judge_mean`` of each run's samples
   is the figure. The labelled pairs of the evaluation runs are a by-product.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "rlaif_dpo_demo.yaml")
DIST_FT = str(Path(sys.executable).with_name("dist-ft"))


def dist_ft(*argv: str) -> str:
    r = subprocess.run([DIST_FT, *argv], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"dist-ft {' '.join(argv)} failed:\n{r.stderr[-3000:]}")
    print(r.stdout.strip().rsplit("\n", 1)[-1], flush=True)
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/rlaif_dpo_bench")
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument(
        "overrides", nargs="*", help="a.b=c for every command (e.g. rollout.group_size=8)"
    )
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    quiet = ["run.wandb=disabled", "run.overwrite=true", *args.overrides]

    labels = out / "labels.jsonl"
    dist_ft("label", CONFIG, f"label.output={labels}", *quiet)
    # A fresh directory: run.overwrite keeps an old run's reference_logprobs.safetensors, which
    # a DPO run on new labels would read back as its own.
    shutil.rmtree(out / "dpo", ignore_errors=True)
    dist_ft("dpo", CONFIG, f"data.source={labels}", f"run.output_dir={out / 'dpo'}", *quiet)
    merged = out / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    dist_ft("export", str(out / "dpo"), "--merge", str(merged))

    figures = {}
    for name, policy in (("before", []), ("after", [f"model.path={merged}"])):
        path = out / f"eval_{name}.jsonl"
        evaluation = [f"label.prompts={args.eval_prompts}", "run.seed=1", *policy]
        dist_ft("label", CONFIG, f"label.output={path}", *quiet, *evaluation)
        figures[name] = json.loads(path.with_suffix(".meta.json").read_text())
    train = json.loads(labels.with_suffix(".meta.json").read_text())
    dpo = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]

    b, a = figures["before"], figures["after"]
    table = [
        "| | judge mean score (1-5) ± s.e. | samples | pairs kept | mean margin, all pairs |",
        "|---|---|---|---|---|",
        *(
            f"| {n} DPO | {m['judge_mean']:.3f} ± {m['judge_std'] / m['samples'] ** 0.5:.3f} "
            f"| {m['samples']} | {m['pairs']}/{m['prompts']} "
            f"| {m['margin_mean']:+.4f} |"
            for n, m in (("before", b), ("after", a))
        ),
        "",
        f"Training labels: {train['pairs']} pairs from {train['prompts']} prompts "
        f"({train['dropped_below_margin']} below min_margin={train['min_margin']}, "
        f"{train['dropped_disagreed']} of them disagreeing; {train['dropped_no_pair']} with no "
        f"two distinct completions). DPO: {len(dpo)} steps, loss {dpo[0]['loss']:.4f} -> "
        f"{dpo[-1]['loss']:.4f}, accuracy {dpo[0]['accuracy']:.2f} -> {dpo[-1]['accuracy']:.2f}. "
        f"Judge mean score {b['judge_mean']:.3f} -> {a['judge_mean']:.3f} "
        f"({a['judge_mean'] - b['judge_mean']:+.3f}).",
    ]
    (out / "rlaif_dpo.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
