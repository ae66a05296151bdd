"""A weight transport written as a user would, named by
``resources.weight_transport=transports:DirTransport``: each version is a safetensors file in a
scratch directory that ``setup`` makes and ``close`` removes. On one machine that is all it
needs; a shared filesystem would carry it across nodes."""

from __future__ import annotations

import shutil
import tempfile
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
