"""Rollout workers, learner ranks and RLAIF judges as Ray actors: placed as
``placement.plan_actors`` says, with timeouts, and a lost rollout share issued again.

Ray is imported inside the functions that use it, so local mode never loads it.
"""

from __future__ import annotations

import dataclasses
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
from dist_ft.cluster.fleet import Fleet, Worker
from dist_ft.cluster.nodes import (
    ActorTimeoutError,
    actor_info,
    cluster_nodes,
    missing_resources,
    rollout_nodes,
    startup_state,
)
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


class RayCluster:
    """Rollout workers and a data-parallel learner group as Ray actors.

    Rollout workers ask for the custom resource ``rollout`` when the cluster advertises it (so
    they land on the nodes set aside for generation) and are spread across nodes; each learner
    is one DeepSpeed rank, rank 0's node address and a free port there form the rendezvous.
    With ``colocate`` rollout worker i and learner rank i share placement-group bundle i. What
    each actor asks for is ``placement.plan_actors``'s, the plan ``dist-ft plan`` predicts with.

    A rollout worker that dies is restarted by Ray (``max_restarts``); the shares it held are
    issued again, to it once it is back or to another worker, after the current weights have
    been loaded there. With ``rollout_workers="auto"`` and the ``rollout`` resource the workers
    are an elastic ``fleet.Fleet`` instead: lost ones leave, new nodes' units get new ones.
    A worker or rank that does not answer within ``timeout_s`` fails the run with its name,
    node and pid.
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

        # Elastic (fleet.py): the workers follow the cluster's `rollout` units.
        elastic = (
            actors.rollout_workers == "auto"
            and not actors.colocate
            and any(n["Resources"].get("rollout") for n in nodes)
        )

        # A blocking transport addresses worker processes: one Ray restarted under the same
        # name would be a stranger to its groups, so a lost worker leaves instead.
        self._leave_on_loss = elastic or self.transport.blocking

        def start_worker(req: ActorRequest) -> Any:
            return self._actor(
                RolloutWorker,
                req,
                max_restarts=0 if self._leave_on_loss else max_restarts,
                max_task_retries=0,  # a lost share is issued again by collect(), not by Ray
            ).remote(rollout, worker_index=req.index, judge=self._judge_for(req.index))

        planned = self.requests.of("rollout")
        handles = [start_worker(a) for a in planned]
        self.learners = [self._actor(LearnerHost, a).remote() for a in self.requests.of("learner")]
        groups: dict[Role, list[Any]] = {
            "rollout": handles,
            "learner": self.learners,
            "judge": self.judges,
        }
        self._info: dict[str, list[Any]] = {
            kind: self._started(kind, group) for kind, group in groups.items()
        }
        self.fleet = Fleet(
            [Worker(h, i, info) for i, (h, info) in enumerate(zip(handles, self._info["rollout"]))],
            # elastic: not colocated, so a joiner asks what worker 0 asked, bundle-free
            lambda i: start_worker(dataclasses.replace(planned[0], index=i)),
            elastic=elastic,
            min_workers=actors.min_rollout_workers,
            max_workers=actors.max_rollout_workers,
            timeout_s=timeout_s,
        )
        self._start_learners(learner)
        self._update: Published | None = None  # the latest weights, as published
        self._syncs = 0

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
    def workers(self) -> list[Any]:
        """The live rollout worker actors, in the order prompt shares go to them."""
        return [w.handle for w in self.fleet.live]

    @property
    def _version(self) -> int:
        """The policy version the rollout workers should hold (0 before the first sync)."""
        return self._update.version if self._update is not None else 0

    # ------------------------------------------------------------------ remote calls
    def _name(self, kind: str, i: int) -> str:
        info = self._info[kind][i]
        return f"{kind} rank {i} (pid {info['pid']} on node {info['ip']})"

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
    def _load_current(self, worker: Worker) -> None:
        """Bring ``worker`` to the latest weights if it is not known to hold them."""
        if self._update is None or worker.version == self._version:
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
        # Read back: the worker was restarted, missed a sync or just joined: worth the cost.
        members = (worker.index,)
        ref = worker.handle.set_weights.remote(
            update, self.transport.bind(members, 1), read_back=True
        )
        sending = self.learners[0].send_weights.remote(self.transport.bind(members, 0))
        try:
            fp = self._get(ref, worker.name)
        except BaseException:  # rank 0 is free again before anything else is asked of it
            self._await_send(sending, failed=True)
            raise
        self._await_send(sending, failed=False)
        check_fingerprints(update, [fp], read_back=True)
        worker.version = update.version

    def _await_send(self, sending: Any, failed: bool) -> None:
        """Wait for rank 0's send; after a receiver ``failed``, its failure is not rank 0's."""
        from ray.exceptions import RayTaskError

        try:
            self._learners_get([sending])
        except RayTaskError:
            if not failed:
                raise

    def _lost(self, worker: Worker, why: str, quiet: bool = False) -> None:
        """A call on ``worker`` failed: it leaves the fleet (elastic, or a blocking transport,
        whose groups name processes), else Ray restarts it with its initial weights."""
        if self._leave_on_loss:
            self.fleet.lose(worker, why)
        elif not quiet:
            warnings.warn(f"{worker.name} {why}; Ray restarts it", stacklevel=3)
        worker.version = None

    def submit_rollout(self, step: int, prompts: list[Prompt]) -> PendingRollout:
        from ray.exceptions import RayActorError

        self.fleet.ensure(self._load_current)
        workers = list(self.fleet.live)
        shares = split_prompts(prompts, len(workers))
        seeds = [share_seed(self.seed, step, k) for k in range(len(shares))]
        for w in workers[: len(shares)]:
            try:
                self._load_current(w)  # a worker Ray restarted holds its initial weights
            except RayActorError as e:  # if still down, collect() reissues
                self._lost(w, f"died before step {step} ({type(e).__name__})")
        versions = [self._version] * len(shares)
        refs = [w.handle.rollout.remote(step, s, sd) for w, s, sd in zip(workers, shares, seeds)]
        for w in workers[: len(shares)]:
            w.busy += 1
        return PendingRollout(step, shares, seeds, versions, refs, owners=workers[: len(shares)])

    def collect(self, pending: PendingRollout) -> ScoredBatch:
        """Wait for every share; a share lost with its worker is issued again (same seed) to
        the next live worker, after that one is brought to the current weights."""
        from ray.exceptions import RayActorError

        for k, result in enumerate(pending.results):
            if isinstance(result, ScoredBatch):
                continue
            ref, owner, expected = result, pending.owners[k], pending.versions[k]
            for attempt in range(len(self.fleet.live) * 4 + 4):
                try:
                    batch = self._get(ref, owner.name)
                    owner.busy -= 1
                    # A worker restarted since its last sync holds its initial weights.
                    if bool((batch.versions == expected).all()):
                        pending.results[k] = batch
                        break
                    cause = f"came back holding weights v{int(batch.versions[0])}"
                except RayActorError as e:
                    owner.busy -= 1
                    cause = f"died ({type(e).__name__})"
                self._lost(owner, f"{cause} at step {pending.step}", quiet=True)
                self.fleet.ensure(self._load_current)  # elastic: none may be left
                live = self.fleet.live
                lost, owner = owner, live[(k + attempt + 1) % len(live)]
                warnings.warn(
                    f"step {pending.step}: {lost.name} {cause}; issuing its "
                    f"{len(pending.shares[k])} prompts again on {owner.name}",
                    stacklevel=2,
                )
                self.fleet.reissued(len(pending.shares[k]))
                owner.busy += 1
                try:
                    self._load_current(owner)
                except RayActorError:
                    continue  # also gone: the next attempt picks another worker
                expected = self._version
                ref = owner.handle.rollout.remote(pending.step, pending.shares[k], pending.seeds[k])
            else:
                raise RuntimeError(f"step {pending.step}: no rollout worker could take share {k}")
        return ScoredBatch.concat(pending.results)

    def fleet_stats(self) -> dict[str, float]:
        return self.fleet.stats()

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
        from ray.exceptions import RayActorError, RayTaskError

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
        workers = list(self.fleet.live)
        members = tuple(w.index for w in workers)
        refs = [
            w.handle.set_weights.remote(update, self.transport.bind(members, i), read_back)
            for i, w in enumerate(workers, start=1)
        ]
        sending = self.learners[0].send_weights.remote(self.transport.bind(members, 0))
        results: list[Any] = []
        for w, ref in zip(workers, refs):
            try:
                results.append(self._get(ref, w.name))
            except (RayActorError, RayTaskError) as e:  # a task error: a broadcast cut short
                results.append(e)
        lost = [w for w, r in zip(workers, results) if isinstance(r, RayActorError)]
        for w in lost:  # elastic or collective: it leaves; else Ray restarts it
            self._lost(w, f"died during weight sync v{update.version}")
        self._await_send(sending, failed=bool(lost))
        if not lost and (broken := [r for r in results if isinstance(r, RayTaskError)]):
            raise broken[0]
        prints = []
        for w, r in zip(workers, results):
            if isinstance(r, str):
                prints.append(r)
                w.version = update.version
            elif w not in lost:  # its copy was cut short: loaded before its next share
                w.version = None
        check_fingerprints(update, prints, read_back)
        return SyncStats(update.version, update.nbytes, time.perf_counter() - t0)

    def save_state(self, ckpt_dir: Path) -> None:
        self._learners_get([h.save_state.remote(str(ckpt_dir)) for h in self.learners])

    def load_state(self, ckpt_dir: Path) -> int:
        return self._learners_get([h.load_state.remote(str(ckpt_dir)) for h in self.learners])[0]

    def rng_states(self) -> list[torch.Tensor]:
        """Each live rollout worker's sampling RNG (its process's torch generator)."""
        from ray.exceptions import RayActorError

        states = []
        for w in list(self.fleet.live):
            ref = w.handle.__ray_call__.remote(lambda _self: torch.get_rng_state())
            try:
                states.append(self._get(ref, w.name))
            except RayActorError as e:
                self._lost(w, f"died during a checkpoint ({type(e).__name__})")
        return states

    def load_rng_states(self, states: list[torch.Tensor]) -> None:
        workers = self.workers
        if len(states) != len(workers):  # another worker count: streams can't carry over
            warnings.warn(
                f"checkpoint has {len(states)} worker RNG states, not restored", stacklevel=2
            )
            return
        refs = [
            w.__ray_call__.remote(lambda _self, s: torch.set_rng_state(s), state)
            for w, state in zip(workers, states)
        ]
        self._get(refs, "rollout workers")

    def save_pretrained(self, out_dir: Path) -> None:
        self._learners_get([h.save_pretrained.remote(str(out_dir)) for h in self.learners])

    def placement(self) -> dict[str, list[Any]]:
        """Node and pid of every actor, the live rollout workers first, learners in rank order."""
        return {**self._info, "rollout": [w.info for w in self.fleet.live]}

    def shutdown(self) -> None:
        import ray

        # the engines' processes first (killed with their actors, they leave files behind)
        workers = self.workers
        ray.wait([w.close.remote() for w in workers], num_returns=len(workers), timeout=30)
        self.fleet.close()
        for actor in workers + self.learners + self.judges:
            ray.kill(actor)
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
        self.transport.close()
        if self._owns_ray:
            ray.shutdown()
