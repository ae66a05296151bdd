"""Debug mode: the rollout workers and the learner in this process, no Ray."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dist_ft.cluster.base import PendingRollout, SyncStats, share_seed, split_prompts
from dist_ft.sync import WeightTransport, check_fingerprints, to_rollout_dtype
from dist_ft.sync.inprocess import InProcessTransport
from dist_ft.wire.batch import ScoredBatch

if TYPE_CHECKING:
    from dist_ft.learner import LearnerSpec
    from dist_ft.rewards.judge import JudgeSpec
    from dist_ft.rollout import RolloutSpec
    from dist_ft.wire.prompt import Prompt


class LocalCluster:
    """Debug mode: every component in this process, called directly. Same classes as on Ray."""

    def __init__(
        self,
        rollout: RolloutSpec,
        learner: LearnerSpec,
        num_workers: int = 1,
        judge: JudgeSpec | None = None,
        transport: WeightTransport | None = None,
    ) -> None:
        from dist_ft.learner import Learner  # deepspeed is imported only where a learner runs
        from dist_ft.rewards.judge import JudgeWorker
        from dist_ft.rollout import RolloutWorker

        self.seed = rollout.seed
        self.rollout_dtype = getattr(torch, rollout.generation.dtype)
        self.learner = Learner(learner)
        self.transport = transport or InProcessTransport()
        self.transport.setup()
        self.judge = JudgeWorker(judge) if judge else None
        self.workers = [
            RolloutWorker(rollout, worker_index=i, judge=self.judge) for i in range(num_workers)
        ]
        # One process: the workers read the learner's frozen base instead of holding copies.
        for worker in self.workers:
            share = getattr(worker.generator, "share_frozen", None)
            if share is not None and learner.zero_stage < 3:
                share(self.learner.module)

    def submit_rollout(self, step: int, prompts: list[Prompt]) -> PendingRollout:
        # Computed now: with max_staleness > 0 the loop submits before it trains, so debug mode
        # sees exactly the staleness that Ray's overlapped generation gives.
        shares = split_prompts(prompts, len(self.workers))
        seeds = [share_seed(self.seed, step, k) for k in range(len(shares))]
        results = [w.rollout(step, s, sd) for w, s, sd in zip(self.workers, shares, seeds)]
        versions = [w.version for w in self.workers[: len(shares)]]
        return PendingRollout(step, shares, seeds, versions, results)

    def collect(self, pending: PendingRollout) -> ScoredBatch:
        return ScoredBatch.concat(pending.results)

    def train_step(self, batch: ScoredBatch, objective: str) -> dict[str, float]:
        return self.learner.step(batch, objective)

    def logprobs(self, batch: ScoredBatch) -> torch.Tensor:
        return self.learner.logprobs(batch)

    def compare(
        self, prompts: list[str], firsts: list[str], seconds: list[str]
    ) -> tuple[list[float], list[list[float]]]:
        if self.judge is None:
            raise RuntimeError("this cluster has no judge: name reward function 'judge'")
        return self.judge.compare(prompts, firsts, seconds)

    def sync_weights(self) -> SyncStats:
        # Debug mode reads every sync back from the workers' models: it is where a new
        # generator or PEFT method is tried first, and the re-export costs little here.
        t0 = time.perf_counter()
        tensors = self.learner.export_weights(changed_only=True)
        tensors = to_rollout_dtype(tensors, self.rollout_dtype)
        update = self.transport.publish(self.learner.version, tensors)
        prints = [w.set_weights(update, self.transport, read_back=True) for w in self.workers]
        check_fingerprints(update, prints, read_back=True)
        return SyncStats(update.version, update.nbytes, time.perf_counter() - t0)

    def save_state(self, ckpt_dir: Path) -> None:
        self.learner.save_state(ckpt_dir)

    def load_state(self, ckpt_dir: Path) -> int:
        return self.learner.load_state(ckpt_dir)

    def rng_states(self) -> list[torch.Tensor]:
        return []  # the workers sample from this process's RNG, which the driver saves

    def load_rng_states(self, states: list[torch.Tensor]) -> None:
        return None

    def save_pretrained(self, out_dir: Path) -> None:
        self.learner.save_pretrained(out_dir)

    def fleet_stats(self) -> dict[str, float]:
        return {}

    def placement(self) -> dict[str, list[Any]]:
        local = {"node_id": "local", "pid": os.getpid()}
        return {"rollout": [local] * len(self.workers), "learner": [local]}

    def shutdown(self) -> None:
        # The world-size-1 process group stays: DeepSpeed caches it, and a later run in this
        # process (tests, notebooks) reuses it.
        for w in self.workers:
            w.close()
        self.transport.close()
