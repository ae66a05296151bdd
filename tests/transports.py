"""A weight transport written as a user would, named by
``resources.weight_transport=transports:DirTransport``: each version is a safetensors file in a
scratch directory that ``setup`` makes and ``close`` removes. On one machine that is all it
needs; a shared filesystem would carry it across nodes."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file

from dist_ft.sync import Published, WeightTransport, describe


class DirTransport(WeightTransport):
    made: ClassVar[list[DirTransport]] = []  # every instance set up in this process, for tests

    def __init__(self) -> None:
        self.root: str | None = None
        self.published: list[int] = []  # versions published through this instance

    def setup(self) -> None:
        self.root = tempfile.mkdtemp(prefix="dist-ft-sync-")
        DirTransport.made.append(self)

    def publish(self, version: int, tensors: dict[str, torch.Tensor]) -> Published:
        assert self.root is not None, "publish before setup"
        path = Path(self.root) / f"v{version}.safetensors"
        save_file(tensors, str(path))
        self.published.append(version)
        return describe(version, tensors, str(path))

    def receive(self, update: Published) -> dict[str, torch.Tensor]:
        return load_file(update.handle)

    def close(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root)


class RendezvousTransport(DirTransport):
    """A blocking transport, as a broadcast is: ``send`` writes the version only once a receiver
    has arrived (its marker file), and ``receive`` waits for it. Rank 0's send and the workers'
    receives must therefore run at the same time; in turn (publish, send, then receive) the
    send times out."""

    blocking = True
    wait_s = 120.0

    def publish(self, version: int, tensors: dict[str, torch.Tensor]) -> Published:
        assert self.root is not None, "publish before setup"
        self.published.append(version)
        return describe(version, tensors, str(Path(self.root) / f"v{version}.safetensors"))

    def send(self, update: Published, tensors: dict[str, torch.Tensor]) -> None:
        _wait_for(Path(update.handle + ".ready"), self.wait_s, "no receiver arrived")
        tmp = update.handle + ".tmp"
        save_file(tensors, tmp)
        os.replace(tmp, update.handle)  # a reader sees the whole file or none

    def receive(self, update: Published) -> dict[str, torch.Tensor]:
        Path(update.handle + ".ready").touch()
        _wait_for(Path(update.handle), self.wait_s, "nothing was sent")
        return load_file(update.handle)


def _wait_for(path: Path, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {seconds:.0f} s ({path})")
        time.sleep(0.05)
