"""``dist-ft plan``: where each actor would go, the derived batch sizes and the bytes a step
moves, from the config and the live cluster, without loading weights or training."""

from __future__ import annotations

from typing import Any

from dist_ft.config import Config


def resolve_rollout_workers(
    setting: int | str, nodes: list[dict[str, Any]], learners: int, gpu: bool
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


def describe_plan(cfg: Config) -> str:
    """Placement (against the running cluster in Ray mode), derived batch sizes, and the bytes
    a step moves, computed without loading weights or training."""
    from transformers import AutoConfig

    from dist_ft.batch import ScoredBatch
    from dist_ft.models import resolve_model_path, sync_bytes
    from dist_ft.ray_connect import init_ray

    res = cfg.resources
    lines = [f"mode: {res.mode}"]
    workers = 1 if res.rollout_workers == "auto" else res.rollout_workers
    if res.mode == "ray":
        import ray

        init_ray(res.ray_address, workers + res.learners)
        try:
            nodes = [n for n in ray.nodes() if n["Alive"]]
        finally:
            ray.shutdown()
        lines += [f"  node {n['NodeManagerAddress']}: {n['Resources']}" for n in nodes]
        gpu = res.device == "cuda"
        workers = resolve_rollout_workers(res.rollout_workers, nodes, res.learners, gpu)
        placed = predict_placement(nodes, workers, res.learners, gpu)
        lines += [f"  {actor:18} -> {node}" for actor, node in placed]
    else:
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
    per_sample = ScoredBatch.bytes_per_sample(
        cfg.data.max_prompt_tokens,
        cfg.rollout.max_new_tokens,
        len(cfg.reward.functions),
        ref=cfg.algo.beta > 0,
        group_size=g,
    )
    path = resolve_model_path(cfg.model.path, cfg.model.tiny)
    sizes = sync_bytes(AutoConfig.from_pretrained(path), cfg.peft, cfg.model.dtype)
    adapter = cfg.peft.method.value != "none"
    sync = sizes["adapter"] if adapter else sizes["full"]
    lines += [
        f"rollout -> learner: <= {per_sample:,} bytes per sample (prompts padded to "
        f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}), <= "
        f"{per_sample * cfg.samples_per_step:,} bytes per step",
        f"learner -> rollout: {sync:,} bytes per sync "
        f"({'adapter only' if adapter else 'full weights'}; full model {sizes['full']:,})",
    ]
    return "\n".join(lines)
