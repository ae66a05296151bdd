"""The rollout workers of a Ray run, and with ``resources.rollout_workers: auto`` on a cluster
whose nodes advertise the ``rollout`` resource, a fleet that follows the cluster.

Elastic, a worker is never restarted by Ray: one that is lost (its process or its node died, or
a partition cut it off until Ray declared the node dead) leaves the fleet, its prompt shares are
issued again to the live workers, and the run goes on with fewer. Before each step is issued the
fleet polls: a ``rollout`` unit that is free (a node joined, or a lost worker's unit was
released) gets a new worker; a new worker whose ``__init__`` returned is brought to the current
weights (a full sync, read back and fingerprinted) and only then takes prompts. Below
``resources.min_rollout_workers`` the run waits for workers to join, and stops with a
``FleetError`` after ``resources.actor_timeout_s``.

Ray is imported inside the functions that use it.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dist_ft.cluster.nodes import actor_info, cluster_nodes


def draining_nodes() -> set[str]:
    """IDs of the nodes being drained (``ray drain-node``; Ray 2.60's GCS accessor)."""
    from ray._private import state

    return set(state.state.get_draining_nodes())


class FleetError(TimeoutError):
    """Fewer rollout workers than resources.min_rollout_workers, for longer than the timeout.
    A TimeoutError: the CLI ends the run with it as one line, exit 1, the adapter saved."""


@dataclass(eq=False)
class Worker:
    """One rollout worker actor, as the driver tracks it."""

    handle: Any
    index: int  # its worker_index: its name in logs and metrics, never reused within a run
    info: dict[str, Any]  # actor_info: node_id, ip, pid
    version: int | None = 0  # the weights version it holds; None: unknown (Ray restarted it)
    busy: int = 0  # prompt shares issued to it and not yet collected

    @property
    def name(self) -> str:
        return f"rollout worker {self.index} (pid {self.info['pid']} on node {self.info['ip']})"


class Fleet:
    """The live rollout workers, in the order shares go to them, and when ``elastic`` the ones
    still starting. ``start(index)`` creates a worker actor (its ``__init__`` runs in the
    background); ``load(worker)`` brings one to the current weights, read back."""

    def __init__(
        self,
        workers: list[Worker],
        start: Callable[[int], Any],
        *,
        elastic: bool,
        min_workers: int = 1,
        max_workers: int = 0,
        timeout_s: float = 600.0,
    ) -> None:
        self.live = workers
        self.elastic = elastic
        self.min_workers, self.max_workers = min_workers, max_workers
        self.timeout_s = timeout_s
        self._start = start
        self._next_index = max((w.index for w in workers), default=-1) + 1
        # (index, handle, ref of its first call, when it was started)
        self._joining: list[tuple[int, Any, Any, float]] = []
        self._leaving: list[Worker] = []  # on a draining node: no new shares, then gone
        self._counts = {"joins": 0, "losses": 0, "drained": 0, "reissued_prompts": 0}

    def lose(self, worker: Worker, why: str) -> None:
        """Elastic: ``worker`` is gone for good (its shares are issued again by the caller)."""
        import ray

        if worker in self._leaving:  # lost while draining: its shares are issued again
            self._leaving.remove(worker)
        elif worker in self.live:
            self.live.remove(worker)
        else:
            return
        self._counts["losses"] += 1
        warnings.warn(
            f"{worker.name} {why}: it leaves the fleet, {len(self.live)} rollout worker(s) left",
            stacklevel=3,
        )
        ray.kill(worker.handle)  # no_restart: a lost worker's unit goes to a new one

    def reissued(self, prompts: int) -> None:
        self._counts["reissued_prompts"] += prompts

    def poll(self, load: Callable[[Worker], None]) -> None:
        """Elastic: started workers go live once loaded; the fleet grows to the live nodes'
        ``rollout`` units (at most ``max_workers``) and drops joiners beyond them."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        if not self.elastic:
            return
        draining = draining_nodes()  # one GCS call a step, for the drain and the target
        self._drain(draining)
        refs = [j[2] for j in self._joining]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        for joiner in [j for j in self._joining if j[2] in ready]:
            self._joining.remove(joiner)
            index, handle, ref, _ = joiner
            try:
                worker = Worker(handle, index, ray.get(ref), None)
                load(worker)
            # died starting or loading (its node left again), a transfer cut short, or hung: it
            # does not join. A load that arrives wrong (SyncMismatchError) still stops the run.
            except (RayActorError, RayTaskError, TimeoutError) as e:
                why = str(e).strip().splitlines()[-1][:300]
                warnings.warn(f"rollout worker {index} did not join: {why}", stacklevel=3)
                ray.kill(handle)
                continue
            self.live.append(worker)
            self._counts["joins"] += 1
            print(
                f"dist-ft: {worker.name} joined with the current weights: "
                f"{len(self.live)} rollout worker(s)",
                file=sys.stderr,
            )
        # The target counts the units of the nodes alive now, not the units free: a lost
        # node's unit is released before the node is declared dead, and a worker started for
        # it would wait for a place forever. Joiners that are not placed yet simply wait for
        # the next node; those beyond the target (nodes left) are dropped, the newest first.
        units = sum(
            int(n["Resources"].get("rollout", 0))
            for n in cluster_nodes()
            if n["NodeID"] not in draining
        )
        target = min(units, self.max_workers) if self.max_workers else units
        now = time.monotonic()
        for joiner in reversed(list(self._joining)):
            if len(self.live) + len(self._joining) > target or now - joiner[3] > self.timeout_s:
                self._joining.remove(joiner)
                ray.kill(joiner[1])
        for _ in range(target - len(self.live) - len(self._joining)):
            handle = self._start(self._next_index)
            ref = handle.__ray_call__.remote(actor_info)
            self._joining.append((self._next_index, handle, ref, now))
            self._next_index += 1

    def _drain(self, draining: set[str]) -> None:
        """Workers on a draining node (``ray drain-node``) take no new shares; each leaves once
        the shares it holds are collected, so a drain wastes no sample."""
        import ray

        for worker in [w for w in self.live if w.info["node_id"] in draining]:
            self.live.remove(worker)
            self._leaving.append(worker)
            print(
                f"dist-ft: {worker.name}: its node is draining; it takes no new prompts and "
                f"leaves after the {worker.busy} share(s) it holds",
                file=sys.stderr,
            )
        for worker in [w for w in self._leaving if w.busy == 0]:
            self._leaving.remove(worker)
            self._counts["drained"] += 1
            # its engine's processes first, as at shutdown; it is idle, so this is quick
            ray.wait([worker.handle.close.remote()], timeout=30)
            ray.kill(worker.handle)
            print(f"dist-ft: {worker.name} drained and left", file=sys.stderr)

    def ensure(self, load: Callable[[Worker], None]) -> None:
        """``poll``, then below ``min_workers`` keep polling each second until enough have
        joined; FleetError after ``timeout_s``."""
        self.poll(load)
        if len(self.live) >= self.min_workers:
            return
        if not self.elastic:  # lost for good (a blocking transport), and none can join
            raise FleetError(
                f"{len(self.live)} rollout worker(s) left of a fixed count: the others were "
                "lost; set resources.rollout_workers=auto on a cluster with the `rollout` "
                "resource for a fleet that replaces them"
            )
        print(
            f"dist-ft: {len(self.live)} rollout worker(s) live, resources.min_rollout_workers="
            f"{self.min_workers}: waiting up to {self.timeout_s:.0f} s for nodes with the "
            "`rollout` resource",
            file=sys.stderr,
        )
        deadline = time.monotonic() + self.timeout_s
        while len(self.live) < self.min_workers:
            if time.monotonic() > deadline:
                raise FleetError(
                    f"{len(self.live)} rollout worker(s) live for {self.timeout_s:.0f} s "
                    f"(resources.actor_timeout_s), fewer than resources.min_rollout_workers="
                    f"{self.min_workers}: no node with a free `rollout` unit joined"
                )
            time.sleep(1.0)
            self.poll(load)

    def stats(self) -> dict[str, float]:
        """This step's fleet metrics: live workers, and joins, losses and prompts issued again
        since the last call."""
        out = {"fleet/workers": float(len(self.live))}
        out.update({f"fleet/{k}": float(v) for k, v in self._counts.items()})
        self._counts = dict.fromkeys(self._counts, 0)
        return out

    def close(self) -> None:
        import ray

        for handle in [j[1] for j in self._joining] + [w.handle for w in self._leaving]:
            ray.kill(handle)
        self._joining.clear()
        self._leaving.clear()
