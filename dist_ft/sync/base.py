"""Versioned weight updates from learner to rollout workers: the ``WeightTransport`` seam, and
fingerprints.

Only what training changes travels: the adapter alone under LoRA (megabytes for a 7B model),
every weight under full fine-tuning. Learner rank 0 *publishes* a version (cast to the rollout
dtype, hashed) and hands back a :class:`Published` note: version, fingerprint, byte count and
a transport handle, never the tensors. The driver forwards that note; each rollout worker
*receives* the tensors through the same transport, hashes what arrived, and loads it. Every
``read_back_every``-th sync (every sync in debug mode) the worker also re-exports and hashes
what its model holds after loading, which catches a load that silently converts or drops.

A transport is one class (``sync/inprocess.py``, ``sync/object_store.py``), named by
``resources.weight_transport`` (see ``sync/__init__.py``) and injected into the cluster, which
calls ``setup`` once before the first sync and ``close`` at shutdown. Its instance is pickled
to the learner and worker actors, so it holds plain values (a path, an address), not sockets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

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


def to_rollout_dtype(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Cast floating tensors once, at the sender: fewer bytes on the wire, and the fingerprint
    is of what the workers will hold."""
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


@dataclass(frozen=True)
class Published:
    """One published version of the weights: what the driver holds and forwards.

    ``handle`` is the transport's: the tensors themselves for :class:`InProcessTransport`, an
    object-store reference on Ray (the driver never fetches it)."""

    version: int
    fingerprint: str  # of the tensors as sent (see fingerprint())
    nbytes: int
    handle: Any


class WeightTransport:
    """How a version of the weights gets from learner rank 0 to every rollout worker.

    Order of calls: ``setup`` on the driver, once. Per sync: ``publish`` on rank 0 returns the
    note (it must not wait for receivers: the driver needs the note to start them); then, at
    the same time, ``send`` on rank 0 and ``receive`` on every worker. ``close`` on the driver
    at shutdown. A transport that delivers in ``publish`` (the object store) leaves ``send`` a
    no-op; one whose transfer needs its receivers present (a broadcast) does it in ``send``,
    and says so with ``blocking``: debug mode, one process, cannot run it.
    """

    blocking = False  # send() waits for the receivers: needs them in other processes

    def setup(self) -> None:
        """Driver side, before the first sync (a rendezvous, a scratch directory)."""

    def publish(self, version: int, tensors: dict[str, torch.Tensor]) -> Published:
        """Learner rank 0: make ``tensors`` available to the workers as ``version``."""
        raise NotImplementedError

    def send(self, update: Published, tensors: dict[str, torch.Tensor]) -> None:
        """Learner rank 0, while the workers receive ``update``: the transfer itself, for a
        transport that needs its receivers present. ``tensors`` are those published."""

    def receive(self, update: Published) -> dict[str, torch.Tensor]:
        """A rollout worker: the tensors of ``update``."""
        raise NotImplementedError

    def bind(self, members: tuple[int, ...], rank: int) -> WeightTransport:
        """This transport as one party of one sync sees it: ``members``, the indices of the
        rollout workers the sync goes to, and ``rank``, 0 for learner rank 0 (the sender) or
        i for ``members[i - 1]``. The driver binds before each call; a transport that
        addresses no one in particular (object store, in-process) is itself."""
        return self

    def close(self) -> None:
        """Driver side, at shutdown: release what ``setup`` made."""


def describe(version: int, tensors: dict[str, torch.Tensor], handle: Any) -> Published:
    """The note a transport returns for ``tensors`` published under ``handle``."""
    nbytes = sum(t.nbytes for t in tensors.values())
    return Published(version, fingerprint(tensors), nbytes, handle)


class SyncMismatchError(RuntimeError):
    """A rollout worker's weights differ from what the learner sent."""


def check_fingerprints(update: Published, worker_prints: list[str], read_back: bool) -> None:
    """Every worker's print must equal the published one. ``read_back``: the prints are of the
    weights re-exported from the workers' models, else of the bytes they received."""
    bad = [i for i, fp in enumerate(worker_prints) if fp != update.fingerprint]
    if bad:
        what = "after loading hold" if read_back else "received"
        raise SyncMismatchError(
            f"weight sync v{update.version}: rollout workers {bad} {what} fingerprints "
            f"{[worker_prints[i][:12] for i in bad]}, learner sent {update.fingerprint[:12]}"
        )
