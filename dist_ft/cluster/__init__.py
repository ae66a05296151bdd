"""Where rollout workers and learners run: the only package that knows local from Ray, and the
only one that imports Ray.

Every cluster offers the training loop the same named calls (the ``Cluster`` protocol in
``base.py``): ``submit_rollout``/``collect``, ``train_step``, ``sync_weights``, checkpoint
state and ``save_pretrained``. ``local.py`` runs them in this process, ``ray.py`` on Ray
actors placed as ``placement.py`` says; ``connect.py`` finds and starts Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dist_ft.cluster.base import Cluster, PendingRollout, SyncStats, share_seed, split_prompts
from dist_ft.cluster.local import LocalCluster
from dist_ft.cluster.placement import ActorRequest, ActorSpec, Placement, plan_actors
from dist_ft.cluster.ray import ActorTimeoutError, RayCluster
from dist_ft.config import ResourcesConfig
from dist_ft.sync import make_transport

if TYPE_CHECKING:
    from dist_ft.learner import LearnerSpec
    from dist_ft.rewards.judge import JudgeSpec
    from dist_ft.rollout import RolloutSpec

__all__ = [
    "ActorRequest",
    "ActorSpec",
    "ActorTimeoutError",
    "Cluster",
    "LocalCluster",
    "PendingRollout",
    "Placement",
    "RayCluster",
    "SyncStats",
    "make_cluster",
    "plan_actors",
    "share_seed",
    "split_prompts",
]


def make_cluster(
    rollout: RolloutSpec,
    learner: LearnerSpec,
    res: ResourcesConfig,
    actors: ActorSpec,
    judge: JudgeSpec | None = None,
    read_back_every: int = 10,
) -> Cluster:
    """In this process (``resources.mode=local``) or as Ray actors; ``actors``: how many of each
    and what they ask for (``run.specs.actor_spec``), ``judge``: the RLAIF judge, if one."""
    transport = make_transport(res.weight_transport, res.mode)
    if res.mode == "local":
        if actors.learners != 1:
            raise ValueError("resources.mode=local runs one learner; use mode=ray for more")
        workers = 1 if actors.rollout_workers == "auto" else int(actors.rollout_workers)
        return LocalCluster(rollout, learner, workers, judge, transport)
    return RayCluster(
        rollout,
        learner,
        actors,
        res.ray_address,
        timeout_s=res.actor_timeout_s,
        max_restarts=res.max_restarts,
        judge=judge,
        read_back_every=read_back_every,
        transport=transport,
    )
