"""A run's output directory: whose it is, what a fresh run clears, and what it keeps."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from dist_ft.config import Config, ConfigError, config_to_dict
from dist_ft.data import Reject, write_rejects
from dist_ft.run import checkpoint, runstatus

if TYPE_CHECKING:
    from dist_ft.cluster import Cluster


def keep_rejects(out: Path, source: str, rejects: list[Reject]) -> None:
    """The rows ``data.on_bad_row=skip`` left out, in <output_dir>/rejects.jsonl, and said."""
    if rejects:
        write_rejects(out / "rejects.jsonl", rejects)
        print(
            f"data: skipped {len(rejects)} malformed rows of {source} "
            f"(data.on_bad_row=skip), written to {out / 'rejects.jsonl'}"
        )


# What a run writes to its output_dir that a later run must not mix with its own. wandb/ stays:
# wandb keeps one directory per run id there.
# What a run writes (besides config.yaml and checkpoints/): run.overwrite=true removes them all,
# so nothing of an old run (a DPO reference pass above all) is read by the new one.
RUN_OUTPUTS = (
    *("metrics.jsonl", "ledger.jsonl", "rejects.jsonl", "placement.json", "adapter", "model"),
    runstatus.STATUS_FILE,
    *("reward.png", "sft.png", "dpo.png", "reference_logprobs.safetensors", "samples.jsonl"),
)


def write_placement(out: Path, cluster: Cluster) -> None:
    """<output_dir>/placement.json: the node and pid of every actor the run holds now (an
    elastic fleet rewrites it when workers join or leave)."""
    (out / "placement.json").write_text(json.dumps(cluster.placement(), indent=1))


def check_run_dir(cfg: Config) -> bool:
    """Whether a fresh run must first remove another run's outputs from ``run.output_dir``
    (``run.overwrite=true``); ConfigError when it holds one and neither ``run.resume`` nor
    ``run.overwrite`` says what to do with it. Reads only: launchers call it before they submit.

    A fresh run refuses a directory that holds another run: its metrics would be overwritten,
    and its higher-numbered checkpoints would outlive the new run's in pruning and be the ones
    ``run.resume=auto`` picks. No run starts in a directory whose run is still training
    (status.json, a live pid here).
    """
    out = Path(cfg.run.output_dir)
    previous = runstatus.read(out)
    if previous is not None and runstatus.running_here(previous):
        raise ConfigError(
            f"run.output_dir={out} {runstatus.unfinished(out)}: stop that process first, or "
            "choose another run.output_dir"
        )
    held = held_outputs(out, ("metrics.jsonl", checkpoint.root(out).name))
    if not held or cfg.run.resume != "none":
        return False
    if not cfg.run.overwrite:
        raise ConfigError(
            f"run.output_dir={out} already holds another run ({', '.join(held)}): choose "
            "another run.output_dir, continue that run with run.resume=auto, or replace it "
            "with run.overwrite=true"
        )
    return True


def prepare_output_dir(cfg: Config) -> Path:
    """``run.output_dir``, created, with the resolved config in it; before any model is loaded.
    Refuses a directory that holds another run (``check_run_dir``); ``run.overwrite=true``
    removes the old run's outputs first."""
    out = Path(cfg.run.output_dir)
    if check_run_dir(cfg):
        ckpts = checkpoint.root(out)
        old = [out / name for name in RUN_OUTPUTS] + [ckpts, *out.glob("*-interrupted-step-*")]
        for path in old:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        print(f"run.overwrite=true: removed the previous run's outputs from {out}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return out


def held_outputs(out: Path, names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` in ``out`` that hold something (a non-empty file or directory)."""
    paths = [out / n for n in names]
    return [
        p.name
        for p in paths
        if (p.is_file() and p.stat().st_size > 0) or (p.is_dir() and any(p.iterdir()))
    ]
