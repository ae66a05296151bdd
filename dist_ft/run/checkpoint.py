"""Atomic run checkpoints: every rank's DeepSpeed state plus the run state, committed or absent.

Layout of ``<output_dir>/checkpoints``::

    step-00000004/            committed: renamed into place after COMMIT was written
        deepspeed/...         each learner rank's engine state (DeepSpeed's own format)
        learner_rng_0.safetensors
        run_state.json        step, sampler cursor, ledger, version, config, tracking run id
        run_tensors.safetensors   driver RNG and the in-flight rollouts of async mode
        COMMIT                sha256 of every file above, written last
    .partial-step-00000006/   a write that never finished: never chosen, named in a warning

A write goes to ``.partial-step-N``; each file is fsynced, COMMIT is written and fsynced, and
only then is the directory renamed to ``step-N`` (atomic on one filesystem). Older checkpoints
are pruned after that rename, so a crash at any point leaves the previous one intact. A write
that fails (a full disk above all) removes its partial directory and keeps the others
(:func:`writing`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

COMMIT = "COMMIT"
PARTIAL_PREFIX = ".partial-"

# Keys that change where or how long a run goes, not what it learns: they may differ on resume.
NON_SEMANTIC = (
    "resources.",
    "run.steps",
    "run.name",
    "run.output_dir",
    "run.wandb",
    "run.plot",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.resume",
    "run.overwrite",  # how a run treats an old run's outputs, not what it learns
    "label.",  # `dist-ft label` only: never read by a training run
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, or from a different recipe)."""


def root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def begin(ckpt_root: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step``."""
    tmp = ckpt_root / f"{PARTIAL_PREFIX}step-{step:08d}"
    if tmp.exists():  # left by a run that died mid-write; it was never committed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_manifest(directory: Path, name: str) -> None:
    """Fsync every file under ``directory``, then write ``directory/name``: the sha256 of each
    (``{"files": {relative path: hex digest}}``), fsynced last with the folders."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / name)
    sums = {}
    for p in files:
        _fsync(p)
        sums[str(p.relative_to(directory))] = _sha256(p)
    manifest = directory / name
    manifest.write_text(json.dumps({"files": sums}, indent=1))
    _fsync(manifest)
    for d in sorted({p.parent for p in files} | {directory}):
        _fsync(d)


def check_manifest(directory: Path, name: str) -> None:
    """Every file that ``directory/name`` (written by :func:`write_manifest`) lists exists with
    its recorded sha256; a manifest that does not parse is itself damage."""
    try:
        listed = json.loads((directory / name).read_text())["files"]
        listed = {str(rel): str(digest) for rel, digest in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{directory}: its {name} file is unreadable ({e})") from None
    for rel, digest in listed.items():
        f = directory / rel
        if not f.is_file() or _sha256(f) != digest:
            raise CheckpointError(f"{directory}: {rel} is missing or does not match {name}")


def commit(tmp: Path, keep: int) -> Path:
    """Fsync every file, write COMMIT (sha256 of each) last, rename into place, prune."""
    write_manifest(tmp, COMMIT)
    final = tmp.parent / tmp.name.removeprefix(PARTIAL_PREFIX)
    if final.exists():  # the same step committed by an earlier attempt of this run
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(tmp.parent)
    prune(tmp.parent, keep)
    return final


@contextlib.contextmanager
def writing(ckpt_root: Path, step: int, keep: int) -> Iterator[Path]:
    """The temporary directory of ``step``'s checkpoint, committed when the block ends. If the
    block or the commit fails, the partial write is removed (it would fill the disk and is
    never resumed from) and the earlier checkpoints stay; a full disk is named as such."""
    tmp = begin(ckpt_root, step)
    try:
        yield tmp
        commit(tmp, keep)
    except BaseException as e:
        full = _no_space(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            kept = [p.name for p in committed(ckpt_root)]
            raise CheckpointError(
                f"no space left on {ckpt_root} writing the checkpoint of step {step} (its "
                f"partial write is removed; kept: {', '.join(kept) or 'none'}): free space "
                "there, or lower run.keep_checkpoints, then continue with run.resume=auto"
            ) from None
        raise


def _no_space(e: BaseException, where: Path) -> bool:
    """Whether ``e`` is a full disk: ENOSPC anywhere in its chain, or, since torch.save says
    only "unexpected pos" and a Ray actor's error arrives as text, under 1 MiB left there."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(e, Exception):  # Ctrl-C mid-write is not a full disk
        return False
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def committed(ckpt_root: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step-*") if (p / COMMIT).is_file())


def prune(ckpt_root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` committed checkpoints, and stale partial writes."""
    for old in committed(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    for partial in ckpt_root.glob(f"{PARTIAL_PREFIX}*"):
        shutil.rmtree(partial)


def verify(path: Path) -> None:
    """Every file listed in COMMIT exists with its recorded sha256."""
    check_manifest(path, COMMIT)


def find_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint that ``run.resume`` names: None for "none"; for "auto" the newest
    committed checkpoint that verifies (partial and corrupt ones are named in a warning), None
    when there is none, and an error when there are some and every one is corrupt: starting
    fresh would replace the run's history (metrics.jsonl, ledger.jsonl)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / COMMIT).is_file():
            raise CheckpointError(f"run.resume={resume}: not a committed checkpoint (no COMMIT)")
        verify(path)
        return path
    ckpt_root = root(output_dir)
    partial = sorted(p.name for p in ckpt_root.glob(f"{PARTIAL_PREFIX}*"))
    if partial:
        warnings.warn(
            f"ignoring unfinished checkpoint writes in {ckpt_root}: {partial}", stacklevel=2
        )
    candidates = committed(ckpt_root)
    for path in reversed(candidates):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warnings.warn(f"skipping corrupt checkpoint: {e}", stacklevel=2)
    if candidates:
        raise CheckpointError(
            f"run.resume=auto: every checkpoint in {ckpt_root} is corrupt "
            f"({', '.join(p.name for p in candidates)}; see the warnings above); nothing was "
            "changed: resume one by path with run.resume=PATH once repaired, start over with "
            "run.resume=none run.overwrite=true (deletes this run's metrics and checkpoints), or "
            "choose another run.output_dir"
        )
    return None


def semantic_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ and that change what a run learns."""

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    a, b = flat(saved), flat(current)
    return sorted(
        k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not k.startswith(NON_SEMANTIC)
    )


def save_run_state(path: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    (path / "run_state.json").write_text(json.dumps(state))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path / "run_tensors.safetensors")
    )


def load_run_state(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    state = json.loads((path / "run_state.json").read_text())
    return state, load_file(str(path / "run_tensors.safetensors"))
