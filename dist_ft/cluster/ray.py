"""Rollout workers, learner ranks and RLAIF judges as Ray actors: placed as
``placement.plan_actors`` says, with timeouts, and a lost rollout share issued again.

Ray is imported inside the functions that use it, so local mode never loads it.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dist_ft.algos.common import merge_stats
from dist_ft.algos.objective import OBJECTIVES
from dist_ft.cluster.base import PendingRollout, SyncStats, share_seed, split_prompts
from dist_ft.cluster.connect import init_ray
from dist_ft.cluster.placement import ActorRequest, ActorSpec, Role, plan_actors
from dist_ft.sync import (
    Published,
    WeightTransport,
    check_fingerprints,
    to_rollout_dtype,
)
from dist_ft.sync.object_store import ObjectStoreTransport
from dist_ft.wire.batch import ScoredBatch, balanced_shards

if TYPE_CHECKING:
    from dist_ft.learner import LearnerSpec
    from dist_ft.rewards.judge import JudgeSpec
    from dist_ft.rollout import RolloutSpec
    from dist_ft.wire.prompt import Prompt


def cluster_nodes() -> list[dict[str, Any]]:
    """The live nodes of the Ray this process is connected to (``ray.nodes()`` entries)."""
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def probe_nodes(address: str) -> list[dict[str, Any]]:
    """The live nodes at ``address`` (see ``init_ray``), for a plan: connects, reads and
    disconnects, unless this process is already connected. ``"local"`` is this machine as it
    is, in ``ray.nodes()`` form: the private Ray a run starts is sized to the actors' request,
    so it would fit any plan and show nothing about the machine."""
    import ray

    if ray.is_initialized():
        return cluster_nodes()
    if address == "local":
        have = {"CPU": float(os.cpu_count() or 1)}
        if gpus := torch.cuda.device_count():
            have["GPU"] = float(gpus)
        return [{"NodeManagerAddress": "127.0.0.1", "Resources": have}]
    init_ray(address, 0)
    try:
        return cluster_nodes()
    finally:
        ray.shutdown()


def rollout_nodes(nodes: list[dict[str, Any]]) -> list[str]:
    """IDs of the nodes set aside for generation (the ``rollout`` resource), else of all."""
    marked = [n["NodeID"] for n in nodes if n["Resources"].get("rollout")]
    return marked or [n["NodeID"] for n in nodes]


class LearnerHost:
    """Ray actor body for one learner rank: reports its address, then builds a ``Learner``."""

    def __init__(self) -> None:
        self.learner: Any = None
        # what rank 0 published and a blocking transport still has to send
        self._outgoing: tuple[Published, dict[str, torch.Tensor]] | None = None

    def address(self) -> tuple[str, int]:
        import ray

        from dist_ft.learner import free_port

        return ray.util.get_node_ip_address(), free_port()

    def start(self, spec: LearnerSpec, rank: int, world_size: int, addr: str, port: int) -> None:
        from dist_ft.learner import Learner

        self.learner = Learner(spec, rank, world_size, addr, port)

    def step(self, batch: ScoredBatch, objective: str) -> dict[str, float]:
        return self.learner.step(batch, objective)

    def publish_weights(
        self, dtype: torch.dtype, transport: Any, changed_only: bool = True
    ) -> Published | None:
        """Every rank exports (ZeRO-3 gathers are collective); rank 0 publishes its copy from
        here, so the tensors go from this actor to the object store and never to the driver.
        ``changed_only``: see ``Learner.export_weights``."""
        tensors = self.learner.export_weights(changed_only=changed_only)
        if self.learner.rank != 0:
            return None
        tensors = to_rollout_dtype(tensors, dtype)
        update = transport.publish(self.learner.version, tensors)
        self._outgoing = (update, tensors) if transport.blocking else None
        return update

    def send_weights(self, transport: Any) -> None:
        """Rank 0, while the workers receive: the transfer of a blocking transport."""
        if self._outgoing is not None:
            update, tensors = self._outgoing
            self._outgoing = None
            transport.send(update, tensors)

    def logprobs(self, batch: ScoredBatch) -> torch.Tensor:
        return self.learner.logprobs(batch)

    def save_state(self, ckpt_dir: str) -> None:
        self.learner.save_state(ckpt_dir)

    def load_state(self, ckpt_dir: str) -> int:
        return self.learner.load_state(ckpt_dir)

    def save_pretrained(self, out_dir: str) -> None:
        self.learner.save_pretrained(out_dir)


def actor_info(_self: Any) -> dict[str, Any]:
    """Run inside an actor (``__ray_call__``): where it is."""
    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}


class RemoteJudge:
    """What a rollout worker holds on Ray instead of a ``JudgeWorker``: the judge actor's
    handle, called the same way."""

    def __init__(self, handle: Any, timeout_s: float) -> None:
        self.handle, self.timeout_s = handle, timeout_s

    def score_with_stats(
        self, prompts: list[str], completions: list[str], group_ids: Sequence[int] | None = None
    ) -> tuple[list[float], dict[str, int]]:
        import ray

        ref = self.handle.score_with_stats.remote(prompts, completions, group_ids)
        return ray.get(ref, timeout=self.timeout_s)


def startup_state(handle: Any, req: ActorRequest) -> str:
    """What keeps an actor that has not answered its first call, from Ray's actor table: not
    placed (and which resources no node has free), placed and still in ``__init__``, dead or
    restarting, or alive and not answering."""
    from ray._private import state

    info = state.actors(handle._actor_id.hex())  # {} if the GCS does not know it
    status, pid = info.get("State", "UNKNOWN"), info.get("Pid") or 0
    where = f"pid {pid} on node {info.get('Address', {}).get('IPAddress') or '?'}"
    if status == "PENDING_CREATION" and not pid:
        return (
            f"not placed: it asks {req.describe_asks()}; "
            f"{missing_resources(req.required(), cluster_nodes())}"
        )
    if status in ("PENDING_CREATION", "DEPENDENCIES_UNREADY"):
        return (
            f"placed ({where}) but still starting: its __init__ (imports, model load) has not "
            "returned; a busy or swapping node is slow, a hung one never returns"
        )
    if status == "RESTARTING":
        return f"crashed while starting and is being restarted (restart {info['NumRestarts']})"
    if status == "DEAD":
        return f"died while starting ({where}): {info.get('DeathCause') or 'no cause recorded'}"
    return f"started ({where}) but its first call did not answer: stalled process or lost node"


def missing_resources(asks: dict[str, float], nodes: list[dict[str, Any]]) -> str:
    """Which of ``asks`` (a resource dict, Ray's names) the cluster cannot give now: what no
    live node has at all, else what is held by other actors or tasks."""
    import ray

    free = ray.available_resources()
    lacking, held = [], []
    for name, need in asks.items():
        most = max((n["Resources"].get(name, 0.0) for n in nodes), default=0.0)
        total = sum(n["Resources"].get(name, 0.0) for n in nodes)
        if most < need:
            lacking.append(f"{need:g} {name} (the largest node has {most:g})")
        elif free.get(name, 0.0) < need:
            held.append(f"{name} ({free.get(name, 0.0):g} of {total:g} free)")
    if lacking:
        return f"no live node has {', '.join(lacking)}: see `dist-ft plan`"
    if held:
        return f"held by other actors or tasks: {', '.join(held)}"
    return "what it asks is free now (freed meanwhile, or split across nodes)"


class ActorTimeoutError(TimeoutError):
    """A rollout worker or learner rank did not answer within resources.actor_timeout_s."""


class RayCluster:
    """Rollout workers and a data-parallel learner group as Ray actors.

    Rollout workers ask for the custom resource ``rollout`` when the cluster advertises it (so
    they land on the nodes set aside for generation) and are spread across nodes; each learner
    is one DeepSpeed rank, rank 0's node address and a free port there form the rendezvous.
    With ``colocate`` rollout worker i and learner rank i share placement-group bundle i. What
    each actor asks for is ``placement.plan_actors``'s, the plan ``dist-ft plan`` predicts with.

    A rollout worker that dies is restarted by Ray (``max_restarts``); the shares it held are
    issued again, to it once it is back or to another worker, after the current weights have
    been loaded there. A worker or rank that does not answer within ``timeout_s`` fails the run
    with its name, node and pid.
    """

    def __init__(
        self,
        rollout: RolloutSpec,
        learner: LearnerSpec,
        actors: ActorSpec,
        address: str = "auto",
        *,
        timeout_s: float = 600.0,
        max_restarts: int = 3,
        judge: JudgeSpec | None = None,
        read_back_every: int = 10,
        transport: WeightTransport | None = None,
    ) -> None:
        import ray

        self.timeout_s = timeout_s
        self.read_back_every = read_back_every
        self.transport = transport or ObjectStoreTransport()
        self.seed = rollout.seed
        self.rollout_dtype = getattr(torch, rollout.generation.dtype)
        # peft.adapters: a sync carries the adapters that changed, not all of them
        self.partial_syncs = bool(rollout.generation.peft.adapters)
        if bool(actors.judges) != (judge is not None):
            raise ValueError(f"{actors.judges} judge actors planned for judge {judge}")
        spec = actors
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:  # before Ray runs: what a one-node Ray must hold
            init_ray(address, plan_actors(spec, []).total()["CPU"])
        self.transport.setup()
        nodes = cluster_nodes()
        self.requests = plan_actors(spec, nodes)
        self._pg = None
        if self.requests.bundles:
            from ray.util.placement_group import placement_group

            self._pg = placement_group(list(self.requests.bundles), strategy="PACK")
            ready, _ = ray.wait([self._pg.ready()], timeout=timeout_s)
            if not ready:
                raise ActorTimeoutError(
                    f"placement group {list(self.requests.bundles)} not placed within "
                    f"{timeout_s:.0f} s (resources.actor_timeout_s): "
                    f"{missing_resources(self.requests.largest(), cluster_nodes())}"
                )

        # Judges first, each on the node of one of the rollout workers it will serve (soft:
        # anywhere if that node is full); the workers then find them by handle.
        self.judges: list[Any] = []
        if judge is not None:
            from dist_ft.rewards.judge import JudgeWorker

            near = rollout_nodes(nodes)
            self.judges = [
                self._actor(JudgeWorker, a, near=near[a.index % len(near)]).remote(judge)
                for a in self.requests.of("judge")
            ]

        from dist_ft.rollout import RolloutWorker

        self.workers = [
            self._actor(
                RolloutWorker,
                a,
                max_restarts=max_restarts,
                max_task_retries=0,  # a lost share is issued again by collect(), not by Ray
            ).remote(rollout, worker_index=a.index, judge=self._judge_for(a.index))
            for a in self.requests.of("rollout")
        ]
        self.learners = [self._actor(LearnerHost, a).remote() for a in self.requests.of("learner")]
        groups: dict[Role, list[Any]] = {
            "rollout": self.workers,
            "learner": self.learners,
            "judge": self.judges,
        }
        self._info: dict[str, list[Any]] = {
            kind: self._started(kind, group) for kind, group in groups.items()
        }
        self._start_learners(learner)
        self._update: Published | None = None  # the latest weights, as published
        self._syncs = 0
        # The weights version each worker holds; None: unknown (Ray restarted it)
        self._worker_version: list[int | None] = [0] * len(self.workers)

    def _actor(self, cls: type, req: ActorRequest, near: str | None = None, **opts: Any) -> Any:
        """``cls`` as a Ray actor class holding exactly ``req``: inside its placement-group
        bundle when colocated; rollout workers spread across nodes; a judge ``near`` a node."""
        import ray
        from ray.util.scheduling_strategies import (
            NodeAffinitySchedulingStrategy,
            PlacementGroupSchedulingStrategy,
        )

        strategy: Any = None
        if req.bundle is not None:
            assert self._pg is not None  # __init__ placed it: a bundle comes with the group
            strategy = PlacementGroupSchedulingStrategy(self._pg, req.bundle)
        elif near is not None:
            strategy = NodeAffinitySchedulingStrategy(near, soft=True)
        elif req.role == "rollout":
            strategy = "SPREAD"
        if strategy is not None:
            opts["scheduling_strategy"] = strategy
        # torch sizes its thread pool from OMP_NUM_THREADS, which actors inherit from the driver
        # (Ray sets it to num_cpus only where the driver has none): an actor would run as many
        # threads as the driver's whole machine. Measured: 2 rollout workers and a learner on 2
        # cores, each with 2 threads, generated at 0.3-0.66 samples/s per worker against
        # 3.4 for one worker alone in debug mode.
        threads = str(max(1, round(req.num_cpus)))
        opts["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}
        return ray.remote(cls).options(
            num_cpus=req.num_cpus, num_gpus=req.num_gpus, resources=dict(req.resources), **opts
        )

    def _started(self, kind: Role, group: list[Any]) -> list[dict[str, Any]]:
        """Where each actor of ``group`` runs, once each has answered (its ``__init__`` done).
        One that has not within the timeout is named with what holds it: resources it waits
        for, a start-up still under way on its node, or its death."""
        import ray
        from ray.exceptions import RayActorError

        refs = [a.__ray_call__.remote(actor_info) for a in group]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            i = refs.index(pending[0])
            req = self.requests.of(kind)[i]
            raise ActorTimeoutError(
                f"{req.name} {startup_state(group[i], req)} "
                f"({self.timeout_s:.0f} s, resources.actor_timeout_s)"
            )
        out = []
        for req, ref in zip(self.requests.of(kind), refs):
            try:
                out.append(ray.get(ref))
            except RayActorError as e:
                raise RuntimeError(f"{req.name} died while starting: {e}") from None
        return out

    def _judge_for(self, i: int) -> RemoteJudge | None:
        if not self.judges:
            return None
        return RemoteJudge(self.judges[i % len(self.judges)], self.timeout_s)

    def _start_learners(self, spec: LearnerSpec) -> None:
        """Rank 0's node address and a free port there form the DeepSpeed rendezvous."""
        master_addr, master_port = self._get(self.learners[0].address.remote(), "learner rank 0")
        n = len(self.learners)
        ranks = enumerate(self.learners)
        self._learners_get([h.start.remote(spec, r, n, master_addr, master_port) for r, h in ranks])

    @property
    def _version(self) -> int:
        """The policy version the rollout workers should hold (0 before the first sync)."""
        return self._update.version if self._update is not None else 0

    # ------------------------------------------------------------------ remote calls
    def _name(self, kind: str, i: int) -> str:
        info = self._info[kind][i]
        label = f"rollout worker {i}" if kind == "rollout" else f"learner rank {i}"
        return f"{label} (pid {info['pid']} on node {info['ip']})"

    def _get(self, refs: Any, who: str) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            return ray.get(refs, timeout=self.timeout_s)
        except GetTimeoutError:
            raise ActorTimeoutError(
                f"{who} did not answer within {self.timeout_s:.0f} s "
                "(resources.actor_timeout_s): stalled process or lost node"
            ) from None

    def _learners_get(self, refs: list[Any]) -> list[Any]:
        """Results of one call on every rank. A dead rank is fatal (its optimizer shard is
        gone): the run stops naming it, to be resumed from the last checkpoint."""
        from ray.exceptions import RayActorError

        out = []
        for r, ref in enumerate(refs):
            try:
                out.append(self._get(ref, self._name("learner", r)))
            except RayActorError as e:
                raise RuntimeError(f"{self._name('learner', r)} died: {e}") from None
        return out

    # ------------------------------------------------------------------ rollout
    def _load_current(self, k: int) -> None:
        """Bring worker ``k`` to the latest weights if it is not known to hold them."""
        if self._update is None or self._worker_version[k] == self._version:
            return
        update = self._update
        # the last sync may lack adapters this worker never received; a blocking transport's
        # data went with its send
        if self.partial_syncs or self.transport.blocking:
            update = self._learners_get(
                [
                    h.publish_weights.remote(self.rollout_dtype, self.transport, False)
                    for h in self.learners
                ]
            )[0]
        # Read back: the worker was restarted or missed a sync, the rare case worth the cost.
        ref = self.workers[k].set_weights.remote(update, self.transport, read_back=True)
        sending = self.learners[0].send_weights.remote(self.transport)
        fp = self._get(ref, self._name("rollout", k))
        self._learners_get([sending])
        check_fingerprints(update, [fp], read_back=True)
        self._worker_version[k] = update.version

    def submit_rollout(self, step: int, prompts: list[Prompt]) -> PendingRollout:
        from ray.exceptions import RayActorError

        shares = split_prompts(prompts, len(self.workers))
        seeds = [share_seed(self.seed, step, k) for k in range(len(shares))]
        for k in range(len(shares)):
            with contextlib.suppress(RayActorError):  # if still down, collect() reissues
                self._load_current(k)  # a worker Ray restarted holds its initial weights
        versions = [self._version] * len(shares)
        refs = [w.rollout.remote(step, s, sd) for w, s, sd in zip(self.workers, shares, seeds)]
        return PendingRollout(step, shares, seeds, versions, refs)

    def collect(self, pending: PendingRollout) -> ScoredBatch:
        """Wait for every share; a share lost with its worker is issued again (same seed)."""
        from ray.exceptions import RayActorError

        for k, result in enumerate(pending.results):
            if isinstance(result, ScoredBatch):
                continue
            ref, target, expected = result, k, pending.versions[k]
            for attempt in range(len(self.workers) * 4):
                try:
                    batch = self._get(ref, self._name("rollout", target))
                    # A worker restarted since its last sync holds its initial weights.
                    if bool((batch.versions == expected).all()):
                        pending.results[k] = batch
                        break
                    cause = f"came back holding weights v{int(batch.versions[0])}"
                except RayActorError as e:
                    cause = f"died ({type(e).__name__})"
                self._worker_version[target] = None
                lost, target = target, (k + attempt + 1) % len(self.workers)
                warnings.warn(
                    f"step {pending.step}: {self._name('rollout', lost)} {cause}; issuing its "
                    f"{len(pending.shares[k])} prompts again on rollout worker {target}",
                    stacklevel=2,
                )
                try:
                    self._load_current(target)
                except RayActorError:
                    continue  # also gone: the next attempt picks another worker
                expected = self._version
                ref = self.workers[target].rollout.remote(
                    pending.step, pending.shares[k], pending.seeds[k]
                )
            else:
                raise RuntimeError(f"step {pending.step}: no rollout worker could take share {k}")
        return ScoredBatch.concat(pending.results)

    # ------------------------------------------------------------------ learning
    def train_step(self, batch: ScoredBatch, objective: str) -> dict[str, float]:
        shards = balanced_shards(batch, len(self.learners), OBJECTIVES[objective].whole_groups)
        per_rank = self._learners_get(
            [h.step.remote(s, objective) for h, s in zip(self.learners, shards)]
        )
        # Each rank's loss is its share of the step's loss: sum them; merge the rest.
        out = merge_stats(per_rank)
        out["loss"] = sum(m["loss"] for m in per_rank)
        out["tokens"] = float(batch.num_tokens)
        return out

    def logprobs(self, batch: ScoredBatch) -> torch.Tensor:
        # Contiguous shares, so the results concatenate back in row order. Every rank runs a
        # forward (ZeRO-3 gathers are collective): one with no rows of its own scores row 0
        # again, and that result is dropped.
        shares = torch.arange(len(batch)).tensor_split(len(self.learners))
        refs = [
            h.logprobs.remote(batch.select(idx if len(idx) else [0]))
            for h, idx in zip(self.learners, shares)
        ]
        out = self._learners_get(refs)
        return torch.cat([o for o, idx in zip(out, shares) if len(idx)])

    def compare(
        self, prompts: list[str], firsts: list[str], seconds: list[str]
    ) -> tuple[list[float], list[list[float]]]:
        """Contiguous shares of the pairs, one per judge actor, judged in parallel."""
        if not self.judges:
            raise RuntimeError("this cluster has no judge: name reward function 'judge'")
        spans = [
            (int(idx[0]), int(idx[-1]) + 1)
            for idx in torch.arange(len(prompts)).tensor_split(len(self.judges))
            if len(idx)
        ]
        refs = [
            judge.compare.remote(prompts[a:b], firsts[a:b], seconds[a:b])
            for judge, (a, b) in zip(self.judges, spans)
        ]
        margins: list[float] = []
        per_principle: list[list[float]] = []
        for m, per in self._get(refs, "judge actors"):
            margins += m
            per_principle += per
        return margins, per_principle

    def sync_weights(self) -> SyncStats:
        from ray.exceptions import RayActorError

        t0 = time.perf_counter()
        published = self._learners_get(
            [h.publish_weights.remote(self.rollout_dtype, self.transport) for h in self.learners]
        )
        update = self._update = published[0]
        # Workers always hash what they received; every read_back_every-th sync (the first
        # included) they also hash what their model holds after loading.
        read_back = self._syncs % self.read_back_every == 0
        self._syncs += 1
        # receives and rank 0's send run at once: a blocking transport needs both sides there
        refs = [w.set_weights.remote(update, self.transport, read_back) for w in self.workers]
        sending = self.learners[0].send_weights.remote(self.transport)
        prints = []
        for k, ref in enumerate(refs):
            try:
                prints.append(self._get(ref, self._name("rollout", k)))
                self._worker_version[k] = update.version
            except RayActorError as e:  # restarted by Ray; loads the weights before its next share
                self._worker_version[k] = None
                warnings.warn(
                    f"{self._name('rollout', k)} died during the weight sync "
                    f"({type(e).__name__}); it loads v{update.version} before its next share",
                    stacklevel=2,
                )
        self._learners_get([sending])
        check_fingerprints(update, prints, read_back)
        return SyncStats(update.version, update.nbytes, time.perf_counter() - t0)

    def save_state(self, ckpt_dir: Path) -> None:
        self._learners_get([h.save_state.remote(str(ckpt_dir)) for h in self.learners])

    def load_state(self, ckpt_dir: Path) -> int:
        return self._learners_get([h.load_state.remote(str(ckpt_dir)) for h in self.learners])[0]

    def rng_states(self) -> list[torch.Tensor]:
        """Each rollout worker's sampling RNG (its process's torch generator)."""
        refs = [w.__ray_call__.remote(lambda _self: torch.get_rng_state()) for w in self.workers]
        return self._get(refs, "rollout workers")

    def load_rng_states(self, states: list[torch.Tensor]) -> None:
        if len(states) != len(self.workers):  # another worker count: streams can't carry over
            warnings.warn(
                f"checkpoint has {len(states)} worker RNG states, not restored", stacklevel=2
            )
            return
        refs = [
            w.__ray_call__.remote(lambda _self, s: torch.set_rng_state(s), state)
            for w, state in zip(self.workers, states)
        ]
        self._get(refs, "rollout workers")

    def save_pretrained(self, out_dir: Path) -> None:
        self._learners_get([h.save_pretrained.remote(str(out_dir)) for h in self.learners])

    def placement(self) -> dict[str, list[Any]]:
        """Node and pid of every actor, rollout workers first, learners in rank order."""
        return self._info

    def shutdown(self) -> None:
        import ray

        # the engines' processes first (killed with their actors, they leave files behind)
        ray.wait(
            [w.close.remote() for w in self.workers], num_returns=len(self.workers), timeout=30
        )
        for actor in self.workers + self.learners + self.judges:
            ray.kill(actor)
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
        self.transport.close()
        if self._owns_ray:
            ray.shutdown()
