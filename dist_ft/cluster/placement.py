"""One resource plan, used twice (STYLE rule 17): what every Ray actor asks for.

``plan_actors`` is the only place that turns the resources settings into per-actor requests.
``RayCluster`` creates its actors and placement group from its result, ``dist-ft plan``
predicts where they go from the same result, and ``launch/slurm/preflight.py`` sums it. Pure:
no Ray, no config tree; the live cluster enters as ``ray.nodes()``-shaped dicts, of which only
``"Resources"`` is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["judge", "rollout", "learner"]


@dataclass(frozen=True)
class ActorSpec:
    """The resources settings, as plain values (the trainer, ``dist-ft plan`` and the SLURM
    preflight build it from ``resources.*``; tests build it directly)."""

    rollout_workers: int | str  # "auto": resolved from the live nodes
    learners: int
    judges: int = 0  # RLAIF judge actors; 0 when no reward function is the judge
    rollout_cpus: float = 1.0
    rollout_gpus: float | str = "auto"
    learner_cpus: float = 1.0
    learner_gpus: float | str = "auto"
    colocate: bool = False
    gpu: bool = False  # the run trains on CUDA (the resolved resources.device)
    min_rollout_workers: int = 1  # "auto" on Ray: below it the run waits (cluster/fleet.py)
    max_rollout_workers: int = 0  # "auto": at most this many; 0: one per `rollout` unit


@dataclass(frozen=True)
class ActorRequest:
    """What one actor asks Ray for. ``bundle`` is its placement-group bundle index when
    colocated (the bundle then holds the CPUs and GPUs), else None."""

    role: Role
    index: int
    num_cpus: float
    num_gpus: float
    resources: Mapping[str, float] = field(default_factory=dict)  # custom resources
    bundle: int | None = None

    @property
    def name(self) -> str:
        return (
            f"learner[rank {self.index}]"
            if self.role == "learner"
            else f"{self.role}[{self.index}]"
        )

    def required(self) -> dict[str, float]:
        """All of it as one resource dict, in Ray's names (a zero GPU request is no request)."""
        gpus = {"GPU": self.num_gpus} if self.num_gpus else {}
        return {"CPU": self.num_cpus, **gpus, **self.resources}

    def describe_asks(self) -> str:
        """``"1 CPU + 0.5 GPU"``: the request, as ``dist-ft plan`` and the preflight print it."""
        return " + ".join(f"{v:g} {k}" for k, v in self.required().items())

    def describe(self) -> str:
        where = f" in bundle {self.bundle}" if self.bundle is not None else ""
        return f"{self.name:18} asks {self.describe_asks()}{where}"


@dataclass(frozen=True)
class Placement:
    """Every actor's request, in the order ``RayCluster`` creates them (judges, rollout
    workers, learner ranks), and the placement-group bundles (empty unless colocated)."""

    actors: tuple[ActorRequest, ...]
    bundles: tuple[Mapping[str, float], ...] = ()

    def of(self, role: Role) -> list[ActorRequest]:
        return [a for a in self.actors if a.role == role]

    def total(self) -> dict[str, float]:
        """Resources the whole run reserves. Colocated actors draw on their bundle, so the
        bundles are counted instead of them."""
        out: dict[str, float] = {}
        loose = [a.required() for a in self.actors if a.bundle is None]
        for need in [*loose, *self.bundles]:
            for k, v in need.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def largest(self) -> dict[str, float]:
        """The biggest single request per resource: a bundle or a loose actor must fit on one
        node whole."""
        out: dict[str, float] = {}
        loose = [a.required() for a in self.actors if a.bundle is None]
        for need in [*loose, *self.bundles]:
            for k, v in need.items():
                out[k] = max(out.get(k, 0.0), v)
        return out


def resolve_rollout_workers(
    setting: int | str, nodes: Sequence[Mapping[str, Any]], learners: int, gpu: bool
) -> int:
    """``resources.rollout_workers``, with ``"auto"`` resolved from the live nodes: one per unit
    of the ``rollout`` resource if any node advertises it, else one per GPU the learners leave
    free, else one per node."""
    if setting != "auto":
        return int(setting)
    totals: dict[str, float] = {}
    for n in nodes:
        for k, v in n["Resources"].items():
            totals[k] = totals.get(k, 0.0) + v
    if totals.get("rollout"):
        return int(totals["rollout"])
    if gpu:
        return max(1, int(totals.get("GPU", 0)) - learners)
    return max(1, len(nodes))


def plan_actors(spec: ActorSpec, nodes: Sequence[Mapping[str, Any]]) -> Placement:
    """Every actor's request for ``spec`` on a cluster of ``nodes`` (``[]`` before Ray runs:
    no ``rollout`` resource, ``"auto"`` workers resolve to 1).

    - A rollout worker asks ``rollout_cpus`` and, when any node advertises the custom resource
      ``rollout``, one unit of it, so it lands on the nodes set aside for generation.
    - A learner rank asks ``learner_cpus``.
    - A judge actor asks what a rollout worker asks, without the ``rollout`` unit (it sits
      beside the workers it serves by node affinity, not by taking one of their slots).
    - ``*_gpus="auto"`` is one GPU on CUDA, none on CPU.
    - ``colocate``: one rollout worker per learner rank; worker i and rank i share bundle i,
      which holds both actors' CPUs and GPUs ("auto" is then half a GPU each: they share one).
    """
    has_rollout = any(n["Resources"].get("rollout") for n in nodes)
    workers = (
        spec.learners
        if spec.colocate
        else resolve_rollout_workers(spec.rollout_workers, nodes, spec.learners, spec.gpu)
    )
    if spec.rollout_workers == "auto" and spec.max_rollout_workers:
        workers = min(workers, spec.max_rollout_workers)
    share = 0.5 if spec.colocate else 1.0

    def gpus(setting: float | str) -> float:
        return (share if spec.gpu else 0.0) if setting == "auto" else float(setting)

    r_gpus, l_gpus = gpus(spec.rollout_gpus), gpus(spec.learner_gpus)
    r_cpus, l_cpus = float(spec.rollout_cpus), float(spec.learner_cpus)
    slot = {"rollout": 1.0} if has_rollout and not spec.colocate else {}

    def bundle(i: int) -> int | None:
        return i if spec.colocate else None

    actors = [
        *(ActorRequest("judge", j, r_cpus, r_gpus) for j in range(spec.judges)),
        *(ActorRequest("rollout", i, r_cpus, r_gpus, slot, bundle(i)) for i in range(workers)),
        *(ActorRequest("learner", r, l_cpus, l_gpus, {}, bundle(r)) for r in range(spec.learners)),
    ]
    pair = {"CPU": r_cpus + l_cpus, **({"GPU": r_gpus + l_gpus} if r_gpus + l_gpus else {})}
    bundles = tuple(dict(pair) for _ in range(spec.learners)) if spec.colocate else ()
    return Placement(tuple(actors), bundles)
