"""``dist-ft plan``: where each actor would go, the derived batch sizes and the bytes a step
moves, from the config and the live cluster, without loading weights or training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dist_ft.cluster.placement import (
    ActorRequest,
    Placement,
    plan_actors,
    resolve_rollout_workers,
)
from dist_ft.config import Config
from dist_ft.costmodel import Rates, StepShape, cost_table
from dist_ft.run.specs import actor_spec

__all__ = [
    "describe_plan",
    "placement_lines",
    "predict_placement",
    "resolve_rollout_workers",
    "step_shape",
]


def predict_placement(
    nodes: list[dict[str, Any]], plan: Placement
) -> list[tuple[ActorRequest, str]]:
    """Where Ray would put each of ``plan``'s actors, as (request, node address), from
    ``ray.nodes()`` entries; "UNSCHEDULABLE" where none fits. A prediction, not a reservation.

    Follows RayCluster's order and strategies: the placement group's bundles first (PACK, all
    or none), then judges (near the rollout nodes, else anywhere), rollout workers (SPREAD:
    each search starts one node further on), learner ranks (first fit). Colocated actors go
    where their bundle went.
    """
    free = [dict(n["Resources"]) for n in nodes]

    def take(i: int, asks: Mapping[str, float]) -> bool:
        if any(free[i].get(k, 0.0) < v for k, v in asks.items()):
            return False
        for k, v in asks.items():
            free[i][k] -= v
        return True

    def first_fit(asks: Mapping[str, float], start: int = 0) -> int | None:
        return next(
            (i for k in range(len(nodes)) if take(i := (start + k) % len(nodes), asks)), None
        )

    bundle_node = [first_fit(b) for b in plan.bundles]
    if None in bundle_node:  # a placement group is reserved whole or not at all
        bundle_node = [None] * len(plan.bundles)
    near = [i for i, n in enumerate(nodes) if n["Resources"].get("rollout")] or list(
        range(len(nodes))
    )
    out: list[tuple[ActorRequest, str]] = []
    for a in plan.actors:
        if a.bundle is not None:
            picked = bundle_node[a.bundle]
        elif a.role == "judge":
            picked = first_fit(a.required(), near[a.index % len(near)]) if nodes else None
        else:
            picked = first_fit(a.required(), a.index if a.role == "rollout" else 0)
        out.append((a, "UNSCHEDULABLE" if picked is None else nodes[picked]["NodeManagerAddress"]))
    return out


def placement_lines(placed: list[tuple[ActorRequest, str]]) -> list[str]:
    """One line per actor, where consecutive actors of one role with one request go to one
    node a line for them all: 10,000 rollout workers print as a few lines, not 10,000."""
    lines: list[str] = []

    def key(item: tuple[ActorRequest, str]) -> tuple[Any, ...]:
        a, node = item
        return a.role, a.describe_asks(), a.bundle, node

    runs: list[list[tuple[ActorRequest, str]]] = []
    for item in placed:
        if runs and key(runs[-1][-1]) == key(item):
            runs[-1].append(item)
        else:
            runs.append([item])
    for run in runs:
        (first, node), last = run[0], run[-1][0]
        if len(run) == 1:
            lines.append(f"  {first.describe()} -> {node}")
        else:
            name = f"{first.role}[{first.index}..{last.index}]"
            lines.append(f"  {name:18} asks {first.describe_asks()} each -> {node} ({len(run)})")
    return lines


def describe_plan(cfg: Config, fleet: list[int] | None = None, rates: Rates | None = None) -> str:
    """Placement (against the running cluster in Ray mode), derived batch sizes, and the bytes
    a step moves, computed without loading weights or training; with ``fleet``, the predicted
    step on each of those rollout worker counts (``dist_ft/costmodel.py``)."""
    res = cfg.resources
    lines = [f"mode: {res.mode}"]
    if res.mode == "ray":
        import torch

        from dist_ft.cluster.nodes import probe_nodes

        # "auto" resolves as the driver will (run.specs.resolve_device); an explicit "cuda" is
        # planned as asked even on a machine without one, which only plans.
        gpu = res.device == "cuda" or (res.device == "auto" and torch.cuda.is_available())
        spec = actor_spec(cfg, gpu)
        nodes = probe_nodes(res.ray_address)
        lines += [f"  node {n['NodeManagerAddress']}: {n['Resources']}" for n in nodes]
        if res.ray_address == "local":
            lines.append(
                "  (this machine; a ray_address=local run starts Ray on it, loopback only)"
            )
        plan = plan_actors(spec, nodes)
        lines += [
            f"  placement group (PACK), bundle {b}: {dict(r)}" for b, r in enumerate(plan.bundles)
        ]
        lines += placement_lines(predict_placement(nodes, plan))
        total = ", ".join(f"{k} {v:g}" for k, v in plan.total().items())
        lines.append(f"  all actors together: {total}")
        cores, need = nodes[0]["Resources"]["CPU"], plan.total()["CPU"]
        if res.ray_address == "local" and need > cores:
            # init_ray gives a private Ray at least the CPUs asked for, so the CPU requests are
            # placed anyway; the actors' threads then share the cores (see OMP_NUM_THREADS).
            lines.append(
                f"  CPU requests beyond this machine's {cores:g} cores: a ray_address=local run "
                f"starts anyway (its Ray gets {need:g} CPU slots), {need / cores:.1f}x "
                "oversubscribed; GPU and custom requests are placed only as listed"
            )
    else:
        workers = 1 if res.rollout_workers == "auto" else res.rollout_workers
        lines.append(f"  {workers} rollout worker(s) and 1 learner in this process")
    if any(f.name == "judge" for f in cfg.reward.functions):
        where = "actor(s) on rollout nodes" if res.mode == "ray" else "in this process"
        lines.append(f"  RLAIF judge: {cfg.reward.judge.actors} {where}")
    b, g = cfg.algo.prompts_per_step, cfg.rollout.group_size
    lines += [
        f"batch: {b} prompts x {g} completions = {cfg.samples_per_step} samples per step; "
        f"{cfg.samples_per_step // res.learners} per learner rank, micro-batch "
        f"{cfg.micro_batch_size} x {cfg.learner.micro_batches} accumulation step(s)",
    ]
    shape = step_shape(cfg)
    lines += [
        f"rollout -> learner: <= {shape.payload_bytes:,} bytes per sample (prompts padded to "
        f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}), <= "
        f"{shape.payload_bytes * cfg.samples_per_step:,} bytes per step",
        f"learner -> rollout: {shape.sync_bytes:,} bytes per sync "
        f"({'full weights' if shape.full else 'adapter only'}; full model {shape.full_bytes:,})",
    ]
    if fleet:
        rates = rates or Rates()
        transport = "collective" if res.weight_transport == "collective" else "object store"
        lines += [
            f"predicted step on a fleet (dist_ft/costmodel.py; {transport} sync; "
            f"{rates.describe()}):",
            *cost_table(shape, fleet, transport, rates),
        ]
    return "\n".join(lines)


def step_shape(cfg: Config, model_config: Any = None) -> StepShape:
    """One step's work under ``cfg``, from the model's config alone (no weights load):
    ``model_config``, else the one in ``cfg.model.path``."""
    from transformers import AutoConfig

    from dist_ft.model.loading import DTYPES, resolve_model_path
    from dist_ft.model.weights import sync_bytes
    from dist_ft.wire.batch import ScoredBatch

    if model_config is None:
        path = resolve_model_path(cfg.model.path, cfg.model.tiny)
        model_config = AutoConfig.from_pretrained(path)
    sizes = sync_bytes(model_config, cfg.peft, cfg.model.dtype)
    full = cfg.peft.method.value == "none"
    return StepShape(
        samples=cfg.samples_per_step,
        prompt_tokens=cfg.data.max_prompt_tokens,
        completion_tokens=cfg.rollout.max_new_tokens,
        payload_bytes=ScoredBatch.bytes_per_sample(
            cfg.data.max_prompt_tokens,
            cfg.rollout.max_new_tokens,
            len(cfg.reward.functions),
            ref=cfg.grpo.beta > 0,
            group_size=cfg.rollout.group_size,
            adapters=bool(cfg.peft.adapters),
        ),
        sync_bytes=sizes["full"] if full else sizes["adapter"],
        full_bytes=sizes["full"],
        params=sizes["full"] // DTYPES[cfg.model.dtype].itemsize,
        full=full,
        learners=cfg.resources.learners,
    )
