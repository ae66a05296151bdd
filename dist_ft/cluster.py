"""Placement: where rollout workers and learners run. The only module that knows local from Ray.

Every cluster offers the same four named calls to the training loop: ``rollout``,
``train_step``, ``sync_weights`` and ``save_pretrained``.
"""

from __future__ import annotations

import itertools
import os
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

    def placement(self) -> dict[str, list[str]]: ...

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

    def placement(self) -> dict[str, list[str]]:
        return {"rollout": ["local"] * len(self.workers), "learner": ["local"]}

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def balanced_shards(batch: ScoredBatch, parts: int) -> list[ScoredBatch]:
    """Equal sample counts per rank (DeepSpeed's batch size is per rank), balanced by tokens:
    samples sorted by length are dealt out in snake order (0, 1, ..., p-1, p-1, ..., 0)."""
    order = torch.argsort(batch.completion_mask.sum(-1), descending=True, stable=True).tolist()
    shards: list[list[int]] = [[] for _ in range(parts)]
    for i, idx in enumerate(order):
        lap, pos = divmod(i, parts)
        shards[pos if lap % 2 == 0 else parts - 1 - pos].append(idx)
    return [batch.select(sorted(s)) for s in shards]


class LearnerHost:
    """Ray actor body for one learner rank: reports its address, then builds a ``Learner``."""

    def __init__(self) -> None:
        self.learner: Any = None

    def address(self) -> tuple[str, int]:
        import ray

        from dist_ft.learner import free_port

        return ray.util.get_node_ip_address(), free_port()

    def start(self, **kwargs: Any) -> None:
        from dist_ft.learner import Learner

        self.learner = Learner(**kwargs)

    def step(self, batch: ScoredBatch, normaliser: float) -> dict[str, float]:
        return self.learner.step(batch, normaliser)

    def sft_step(self, *tensors: torch.Tensor, normaliser: float) -> dict[str, float]:
        return self.learner.sft_step(*tensors, normaliser=normaliser)

    def export_weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        return self.learner.version, self.learner.export_weights()

    def save_pretrained(self, out_dir: str) -> None:
        self.learner.save_pretrained(out_dir)


def init_ray(address: str, num_actors: int) -> None:
    """Connect to ``address``; ``"local"`` starts a private single-node Ray (never attaching to
    another cluster on this machine), without a dashboard, with a CPU slot for every actor
    (each asks for one) even on a machine with fewer cores."""
    import ray

    if address == "local":
        ray.init(
            address="local", num_cpus=max(os.cpu_count() or 1, num_actors), include_dashboard=False
        )
    else:
        ray.init(address=address)


class RayCluster:
    """Rollout workers and a data-parallel learner group as Ray actors.

    Rollout workers ask for the custom resource ``rollout`` when the cluster advertises it (so
    they land on the nodes set aside for generation) and are spread across nodes; each learner
    is one DeepSpeed rank, rank 0's node address and a free port there form the rendezvous.
    """

    def __init__(
        self,
        worker_kwargs: dict[str, Any],
        learner_kwargs: dict[str, Any],
        num_workers: int,
        num_learners: int,
        address: str = "auto",
    ) -> None:
        import ray

        from dist_ft.rollout import RolloutWorker

        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            init_ray(address, num_workers + num_learners)
        rollout_resources = {"rollout": 1} if ray.cluster_resources().get("rollout") else {}
        gpu = 1 if learner_kwargs["device"] == "cuda" else 0
        self.workers = [
            ray.remote(RolloutWorker)
            .options(
                num_cpus=1,
                num_gpus=gpu,
                resources=rollout_resources,
                scheduling_strategy="SPREAD",
                max_restarts=0,
            )
            .remote(**worker_kwargs, worker_index=i)
            for i in range(num_workers)
        ]
        self.learners = [
            ray.remote(LearnerHost).options(num_cpus=1, num_gpus=gpu).remote()
            for _ in range(num_learners)
        ]
        master_addr, master_port = ray.get(self.learners[0].address.remote())
        ray.get(
            [
                host.start.remote(
                    **learner_kwargs,
                    rank=rank,
                    world_size=num_learners,
                    master_addr=master_addr,
                    master_port=master_port,
                )
                for rank, host in enumerate(self.learners)
            ]
        )

    def rollout(self, step: int, prompts: list[Prompt]) -> ScoredBatch:
        import ray

        shares = split_prompts(prompts, len(self.workers))
        refs = [w.rollout.remote(step, s) for w, s in zip(self.workers, shares)]
        return ScoredBatch.concat(ray.get(refs))

    def train_step(self, batch: ScoredBatch, normaliser: float) -> dict[str, float]:
        import ray

        shards = balanced_shards(batch, len(self.learners))
        per_rank = ray.get([h.step.remote(s, normaliser) for h, s in zip(self.learners, shards)])
        # Each rank's loss is its share of the step's loss: sum them; average the rest.
        out = {k: sum(m[k] for m in per_rank) / len(per_rank) for k in per_rank[0]}
        out["loss"] = sum(m["loss"] for m in per_rank)
        out["tokens"] = float(batch.num_tokens)
        return out

    def sft_step(self, *tensors: torch.Tensor) -> dict[str, float]:
        import ray

        index = torch.arange(len(tensors[0])).chunk(len(self.learners))
        normaliser = float(tensors[-1].sum().clamp(min=1))  # target tokens of the whole step
        per_rank = ray.get(
            [
                h.sft_step.remote(*(t[i] for t in tensors), normaliser=normaliser)
                for h, i in zip(self.learners, index)
            ]
        )
        # Each rank's loss is its share of the step's loss.
        return {"loss": sum(m["loss"] for m in per_rank)}

    def sync_weights(self) -> SyncStats:
        import ray

        t0 = time.perf_counter()
        # Every rank takes part (ZeRO-3 gathers are collective); rank 0's copy is published.
        version, tensors = ray.get([h.export_weights.remote() for h in self.learners])[0]
        update = make_update(version, tensors)
        ref = ray.put(update.tensors)  # once into the object store; every worker reads it
        prints = ray.get([w.set_weights.remote(update.version, ref) for w in self.workers])
        check_fingerprints(update, prints)
        return SyncStats(update.version, update.nbytes, time.perf_counter() - t0)

    def save_pretrained(self, out_dir: Path) -> None:
        import ray

        ray.get([h.save_pretrained.remote(str(out_dir)) for h in self.learners])

    def placement(self) -> dict[str, list[str]]:
        """Ray node id of every actor, rollout workers first, learners in rank order."""
        import ray

        def node_id(_self: Any) -> str:
            return ray.get_runtime_context().get_node_id()

        return {
            "rollout": ray.get([w.__ray_call__.remote(node_id) for w in self.workers]),
            "learner": ray.get([h.__ray_call__.remote(node_id) for h in self.learners]),
        }

    def shutdown(self) -> None:
        import ray

        for actor in self.workers + self.learners:
            ray.kill(actor)
        if self._owns_ray:
            ray.shutdown()


def make_cluster(
    mode: str,
    worker_kwargs: dict[str, Any],
    learner_kwargs: dict[str, Any],
    num_workers: int,
    num_learners: int,
    ray_address: str = "auto",
) -> Cluster:
    if mode == "local":
        if num_learners != 1:
            raise ValueError("resources.mode=local runs one learner; use mode=ray for more")
        return LocalCluster(worker_kwargs, learner_kwargs, num_workers)
    return RayCluster(worker_kwargs, learner_kwargs, num_workers, num_learners, ray_address)


def predict_placement(
    nodes: list[dict[str, Any]], num_workers: int, num_learners: int, gpu: bool
) -> list[tuple[str, str]]:
    """Where Ray would put each actor, as (actor, node address), from ``ray.nodes()`` entries.

    Mirrors RayCluster's requests: a rollout worker needs 1 CPU (+1 GPU) and 1 ``rollout`` when
    any node has that resource, spread across nodes; a learner needs 1 CPU (+1 GPU). A
    prediction for the plan, not a reservation.
    """
    free = [dict(n["Resources"]) for n in nodes]
    need_rollout = any(r.get("rollout") for r in free)

    def take(i: int, rollout: bool) -> bool:
        asks = {
            "CPU": 1.0,
            **({"GPU": 1.0} if gpu else {}),
            **({"rollout": 1.0} if rollout else {}),
        }
        if any(free[i].get(k, 0.0) < v for k, v in asks.items()):
            return False
        for k, v in asks.items():
            free[i][k] -= v
        return True

    out: list[tuple[str, str]] = []
    for w in range(num_workers):  # SPREAD: start each search one node further on
        picked = next(
            (i for k in range(len(nodes)) if take(i := (w + k) % len(nodes), need_rollout)), None
        )
        out.append(
            (
                f"rollout[{w}]",
                "UNSCHEDULABLE" if picked is None else nodes[picked]["NodeManagerAddress"],
            )
        )
    for r in range(num_learners):
        picked = next((i for i in range(len(nodes)) if take(i, False)), None)
        out.append(
            (
                f"learner[rank {r}]",
                "UNSCHEDULABLE" if picked is None else nodes[picked]["NodeManagerAddress"],
            )
        )
    return out
