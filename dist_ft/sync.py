"""Versioned weight updates from learner to rollout workers, with fingerprints.

Only what training changes travels: the adapter alone under LoRA (megabytes for a 7B model),
every weight under full fine-tuning. Both ends hash what they hold; a mismatch is an error.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order. Bit-exact, not approximate."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # uint8 view: numpy has no bfloat16, and the raw bytes are what we want to compare.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class WeightUpdate:
    version: int
    tensors: dict[str, torch.Tensor]
    fingerprint: str

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def make_update(
    version: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> WeightUpdate:
    """Version ``version`` of the weights, cast to the rollout ``dtype`` (once, at the sender:
    fewer bytes on the wire, and the fingerprint is of what the workers will hold)."""
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return WeightUpdate(version, tensors, fingerprint(tensors))


class SyncMismatchError(RuntimeError):
    """A rollout worker's weights differ from what the learner sent."""


def check_fingerprints(update: WeightUpdate, worker_prints: list[str]) -> None:
    bad = [i for i, fp in enumerate(worker_prints) if fp != update.fingerprint]
    if bad:
        raise SyncMismatchError(
            f"weight sync v{update.version}: rollout workers {bad} hold fingerprints "
            f"{[worker_prints[i][:12] for i in bad]}, learner sent {update.fingerprint[:12]}"
        )
