"""What Ray says about the cluster and its actors: the live nodes, where an actor runs, and
what keeps an actor from starting (not placed, still in ``__init__``, dead).

Ray is imported inside the functions that use it, so local mode never loads it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dist_ft.cluster.connect import init_ray
from dist_ft.cluster.placement import ActorRequest


class ActorTimeoutError(TimeoutError):
    """A rollout worker or learner rank did not answer within resources.actor_timeout_s."""


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


def actor_info(_self: Any) -> dict[str, Any]:
    """Run inside an actor (``__ray_call__``): where it is."""
    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}


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
