"""A run's final weights (``adapter/`` or ``model/``): sealed with a MANIFEST.json when saved,
checked (manifest, finite values, magnitude) before export, merge or compare read them."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dist_ft.model.spec import PeftMethod
from dist_ft.run import checkpoint

MANIFEST = "MANIFEST.json"  # sha256 of every file of a final adapter/ or model/, and of an OUT


# The largest |weight| an export or merge accepts: fp16's largest finite value. A weight past it
# turns into inf as soon as the model is served in half precision, as released LLMs routinely
# are, so no working checkpoint holds one (trained weights are O(1)); past it is a damaged file
# or a diverged run (8 flipped bytes gave 1.18e29).
MAX_ABS_WEIGHT = torch.finfo(torch.float16).max  # 65504


class ExportError(ValueError):
    """An export or merge dist_ft refuses, or a run directory that lacks what it needs."""


def finished_run(run_dir: str | Path, name: str | None = None) -> tuple[Any, Path]:
    """A finished run's resolved config (``Config``) and its final weights: ``adapter/`` under
    PEFT, ``model/`` for full fine-tuning; ``adapter/<name>/`` of a run with several
    (``peft.adapters``), which must name one."""
    from dist_ft.config import load_config
    from dist_ft.run.runstatus import unfinished

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ExportError(f"{run} is not a run directory: it has no config.yaml")
    cfg = load_config(run / "config.yaml")
    weights = run / ("model" if cfg.peft.method is PeftMethod.NONE else "adapter")
    if why := unfinished(run):
        kept = sorted(p.name for p in run.glob(f"{weights.name}-interrupted-step-*"))
        raise ExportError(
            f"{run} {why}: only a finished run is exported; continue it with run.resume=auto"
            + (f" (the weights it kept: {', '.join(kept)})" if kept else "")
        )
    if not weights.is_dir():
        raise ExportError(
            f"{run} has no {weights.name}/ (a run saves it when it finishes; an interrupted "
            f"one leaves {weights.name}-interrupted-step-N/ to copy into its place)"
        )
    names = list(cfg.peft.adapters)
    if names and name not in names:
        raise ExportError(
            f"{run} trained adapters {names} (peft.adapters): name one with --name"
            + ("" if name is None else f" ({name!r} is not one of them)")
        )
    if name is not None and not names:
        raise ExportError(f"--name {name}: {run} trained one adapter, not peft.adapters")
    if (weights / MANIFEST).is_file():
        check_sealed(weights)
    else:
        print(
            f"dist-ft: warning: {weights} has no {MANIFEST} (saved by an older dist_ft): its "
            "files are checked for damage by their values only",
            file=sys.stderr,
        )
    if names:
        assert name is not None  # a name not among names raised above, None included
        weights = weights / name
    check_weights(weights)
    return cfg, weights


def seal(directory: str | Path) -> None:
    """Make a directory of final weights what a user gets: its files readable as the umask
    allows (peft and safetensors write 0600, through a temporary file), then a MANIFEST.json of
    their sha256 that export, merge and compare check before they read them."""
    directory = Path(directory)
    umask = os.umask(0)  # the only way to read it; set back at once
    os.umask(umask)
    for f in directory.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)
    checkpoint.write_manifest(directory, MANIFEST)


def check_sealed(directory: Path) -> None:
    """``directory``'s MANIFEST.json matches its files (one line naming the file that doesn't)."""
    try:
        checkpoint.check_manifest(directory, MANIFEST)
    except checkpoint.CheckpointError as e:
        raise ExportError(
            f"{e}: the weights changed after they were saved (damaged or edited); restore them "
            "or re-save them from the run's checkpoint"
        ) from None


def check_weights(directory: Path) -> None:
    """Every tensor of every safetensors file under ``directory`` parses, is finite and within
    ``MAX_ABS_WEIGHT``; read one tensor at a time, before any model loads."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(directory.rglob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as st:
                check_tensors(((k, st.get_tensor(k)) for k in st.keys()), str(f))  # noqa: SIM118
        except SafetensorError as e:
            raise ExportError(
                f"{f} is not a readable safetensors file ({e}): restore it or re-save the weights"
            ) from None


def check_tensors(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Refuse, naming ``where`` and the tensor, a non-finite value or one past MAX_ABS_WEIGHT."""
    for key, t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ExportError(
                f"{where}: tensor {key} holds {bad} non-finite values (NaN or inf) of "
                f"{t.numel()}: the weights are damaged or training diverged; nothing was written"
            )
        peak = float(t.abs().max())
        if peak > MAX_ABS_WEIGHT:
            raise ExportError(
                f"{where}: tensor {key} holds a weight of magnitude {peak:.3g}, past "
                f"{MAX_ABS_WEIGHT:g} (fp16's range; trained weights are O(1)): the weights are "
                "damaged or training diverged; nothing was written"
            )
