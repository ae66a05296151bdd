"""Weights through Ray's object store, the default on Ray."""

from __future__ import annotations

import torch

from dist_ft.sync.base import Published, WeightTransport, describe


class ObjectStoreTransport(WeightTransport):
    """Weights through Ray's object store: ``publish`` runs inside learner rank 0's actor, which
    puts the tensors once and owns them; each worker's ``receive`` pulls them to its node. The
    driver only ever holds the reference."""

    def publish(self, version: int, tensors: dict[str, torch.Tensor]) -> Published:
        import ray

        return describe(version, tensors, ray.put(tensors))

    def receive(self, update: Published) -> dict[str, torch.Tensor]:
        import ray

        return ray.get(update.handle)
