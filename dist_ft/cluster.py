"""Placement: where rollout workers and learners run. The only module that knows local from Ray.

Every cluster offers the same four named calls to the training loop: ``rollout``,
``train_step``, ``sync_weights`` and ``save_pretrained``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dist_ft.batch import ScoredBatch
from dist_ft.data import Prompt
from dist_ft.sync import check_fingerprints, make_update


@dataclass(frozen=True)
class SyncStats:
    version: int
    nbytes: int
    seconds: float


class Cluster(Protocol):
    def rollout(self, step: int, prompts: list[Prompt]) -> ScoredBatch: ...

    def train_step(self, batch: ScoredBatch, normaliser: float) -> dict[str, float]: ...

    def sft_step(self, *tensors: torch.Tensor) -> dict[str, float]: ...

    def sync_weights(self) -> SyncStats: ...

    def save_pretrained(self, out_dir: Path) -> None: ...

    def shutdown(self) -> None: ...


def split_prompts(prompts: list[Prompt], parts: int) -> list[list[Prompt]]:
    """Contiguous, near-equal shares of whole prompt groups (a group never spans workers)."""
    bounds = torch.linspace(0, len(prompts), parts + 1).round().long().tolist()
    return [prompts[a:b] for a, b in itertools.pairwise(bounds) if b > a]


class LocalCluster:
    """Debug mode: every component in this process, called directly. Same classes as on Ray."""

    def __init__(
        self,
        worker_kwargs: dict[str, Any],
        learner_kwargs: dict[str, Any],
        num_workers: int = 1,
    ) -> None:
        from dist_ft.learner import Learner  # deepspeed is imported only where a learner runs
        from dist_ft.rollout import RolloutWorker

        self.learner = Learner(**learner_kwargs)
        self.workers = [RolloutWorker(**worker_kwargs, worker_index=i) for i in range(num_workers)]

    def rollout(self, step: int, prompts: list[Prompt]) -> ScoredBatch:
        shares = split_prompts(prompts, len(self.workers))
        return ScoredBatch.concat([w.rollout(step, s) for w, s in zip(self.workers, shares)])

    def train_step(self, batch: ScoredBatch, normaliser: float) -> dict[str, float]:
        return self.learner.step(batch, normaliser)

    def sft_step(self, *tensors: torch.Tensor) -> dict[str, float]:
        return self.learner.sft_step(*tensors)

    def sync_weights(self) -> SyncStats:
        t0 = time.perf_counter()
        update = make_update(self.learner.version, self.learner.export_weights())
        prints = [w.set_weights(update.version, update.tensors) for w in self.workers]
        check_fingerprints(update, prints)
        return SyncStats(update.version, update.nbytes, time.perf_counter() - t0)

    def save_pretrained(self, out_dir: Path) -> None:
        self.learner.save_pretrained(out_dir)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
