"""One resource plan, used twice (STYLE rule 17): ``placement.plan_actors`` is what RayCluster
asks Ray for, what `dist-ft plan` predicts with and what the SLURM preflight sums. Pure unit
tests of the function, then the agreement test against what a live local Ray granted."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_ft.cluster.placement import ActorRequest, ActorSpec, plan_actors
from dist_ft.recipes.plan import predict_placement

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # dist-ft, python and ray, for ray_submit.sh


def node(addr="10.0.0.1", **resources):
    return {"NodeManagerAddress": addr, "NodeID": addr, "Resources": resources}


def asks(plan, role):
    return [a.required() for a in plan.of(role)]


def test_defaults_on_cpu_ask_one_cpu_each_and_no_gpu():
    plan = plan_actors(ActorSpec("auto", 1), [node(CPU=8.0), node("10.0.0.2", CPU=8.0)])
    # "auto" workers on CPU: one per node
    assert plan.actors == (
        ActorRequest("rollout", 0, 1.0, 0.0),
        ActorRequest("rollout", 1, 1.0, 0.0),
        ActorRequest("learner", 0, 1.0, 0.0),
    )
    assert plan.bundles == () and plan.total() == {"CPU": 3.0}
    # before Ray runs (no nodes yet) "auto" is one worker
    assert len(plan_actors(ActorSpec("auto", 1), []).of("rollout")) == 1


def test_cpu_settings_are_what_each_actor_asks():
    plan = plan_actors(ActorSpec(2, 2, rollout_cpus=2, learner_cpus=1.5), [])
    assert asks(plan, "rollout") == [{"CPU": 2.0}] * 2
    assert asks(plan, "learner") == [{"CPU": 1.5}] * 2
    assert plan.total() == {"CPU": 7.0} and plan.largest() == {"CPU": 2.0}


def test_auto_gpus_are_one_each_on_cuda_and_none_on_cpu():
    on_cuda = plan_actors(ActorSpec(2, 1, gpu=True), [])
    assert asks(on_cuda, "rollout") == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert asks(on_cuda, "learner") == [{"CPU": 1.0, "GPU": 1.0}]
    assert on_cuda.total() == {"CPU": 3.0, "GPU": 3.0}
    on_cpu = plan_actors(ActorSpec(2, 1, gpu=False), [])
    assert on_cpu.total() == {"CPU": 3.0}
    # an explicit value is taken as given, on either device
    for gpu in (True, False):
        plan = plan_actors(ActorSpec(1, 1, rollout_gpus=0.25, learner_gpus=2, gpu=gpu), [])
        assert asks(plan, "rollout") == [{"CPU": 1.0, "GPU": 0.25}]
        assert asks(plan, "learner") == [{"CPU": 1.0, "GPU": 2.0}]
    # "auto" workers on CUDA: one per GPU the learners leave free
    nodes = [node(CPU=8.0, GPU=4.0)]
    assert len(plan_actors(ActorSpec("auto", 1, gpu=True), nodes).of("rollout")) == 3


def test_the_rollout_resource_is_asked_by_rollout_workers_only():
    nodes = [node(CPU=4.0), node("10.0.0.2", CPU=4.0, rollout=2.0)]
    plan = plan_actors(ActorSpec("auto", 1, judges=1), nodes)
    assert asks(plan, "rollout") == [{"CPU": 1.0, "rollout": 1.0}] * 2  # "auto": one per unit
    assert asks(plan, "judge") == asks(plan, "learner") == [{"CPU": 1.0}]
    assert plan.total() == {"CPU": 4.0, "rollout": 2.0}
    where = {a.name: n for a, n in predict_placement(nodes, plan)}
    assert where["rollout[0]"] == where["rollout[1]"] == where["judge[0]"] == "10.0.0.2"
    assert where["learner[rank 0]"] == "10.0.0.1"


def test_colocate_pairs_each_worker_with_a_rank_in_one_bundle():
    nodes = [node(CPU=8.0, GPU=2.0, rollout=4.0)]
    plan = plan_actors(ActorSpec(5, 2, colocate=True, gpu=True), nodes)
    # one worker per rank, whatever rollout_workers says; half a GPU each; no `rollout` slot
    assert [(a.role, a.index, a.bundle) for a in plan.actors] == [
        ("rollout", 0, 0),
        ("rollout", 1, 1),
        ("learner", 0, 0),
        ("learner", 1, 1),
    ]
    assert all(a.required() == {"CPU": 1.0, "GPU": 0.5} for a in plan.actors)
    assert plan.bundles == ({"CPU": 2.0, "GPU": 1.0},) * 2
    assert plan.total() == {"CPU": 4.0, "GPU": 2.0}  # the bundles, not the actors again
    assert {n for _, n in predict_placement(nodes, plan)} == {"10.0.0.1"}
    on_cpu = plan_actors(ActorSpec(1, 1, rollout_cpus=2, colocate=True), [])
    assert on_cpu.bundles == ({"CPU": 3.0},) and on_cpu.largest() == {"CPU": 3.0}
    # a placement group is reserved whole or not at all
    small = [node(CPU=2.0, GPU=2.0)]
    assert {n for _, n in predict_placement(small, plan)} == {"UNSCHEDULABLE"}


def test_judge_actors_ask_what_a_rollout_worker_asks():
    plan = plan_actors(ActorSpec(2, 1, judges=2, rollout_cpus=2, gpu=True), [])
    assert [a.name for a in plan.actors[:2]] == ["judge[0]", "judge[1]"]  # created first
    assert asks(plan, "judge") == [{"CPU": 2.0, "GPU": 1.0}] * 2
    assert plan.total() == {"CPU": 9.0, "GPU": 5.0}


def preflight(*args):
    return subprocess.run(
        [sys.executable, "launch/slurm/preflight.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_slurm_preflight_sums_the_same_requests():
    # 2 workers at 2 CPUs + 1 learner at 1: 5 CPUs
    r = preflight("--nodes", "1", "--cpus-per-node", "4", "configs/demo.yaml",
                  "resources.mode=ray", "resources.rollout_workers=2",
                  "resources.rollout_cpus=2")  # fmt: skip
    assert r.returncode == 3 and "need 5 CPUs" in r.stderr, r.stderr
    # a colocated bundle (1 + 1 CPUs) must fit on one node whole
    r = preflight("--nodes", "2", "--cpus-per-node", "1.5", "configs/demo.yaml",
                  "resources.mode=ray", "resources.colocate=true")  # fmt: skip
    assert r.returncode == 3 and "the largest single request 2" in r.stderr, r.stderr


def test_preflight_and_ray_submit_refuse_a_used_output_dir(tmp_path):
    """A run.output_dir that holds another run is refused before anything is submitted, with the
    trainer's own message and exit 2: by the SLURM preflight (before Ray starts) and by
    ray_submit.sh (before its upload: no Ray answers at its address, and it never asks)."""
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    refusal = f"dist_ft: error: run.output_dir={used} already holds another run (metrics.jsonl): "
    r = preflight("--nodes", "1", "--cpus-per-node", "4", "configs/demo.yaml",
                  "resources.mode=ray", f"run.output_dir={used}")  # fmt: skip
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith(refusal), r.stderr
    r = preflight("configs/demo.yaml", f"run.output_dir={used}", "run.resume=auto")
    assert r.returncode == 0 and r.stdout == f"dist_ft: run.output_dir={used}: ok\n", r.stderr
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(
        ["launch/ray_submit.sh", "--address", "http://127.0.0.1:9", "configs/demo.yaml",
         f"run.output_dir={used}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith(refusal), r.stderr
    assert "run outputs go to" not in r.stderr  # stopped before it would submit


# ---------------------------------------------------------------- agreement with a live Ray
def granted(role, index, resources, bundle):
    """An ActorRequest from what Ray granted, to compare field by field with the plan."""
    rest = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    return ActorRequest(
        role, index, resources.get("CPU", 0.0), resources.get("GPU", 0.0), rest, bundle
    )


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("rlaif_demo.yaml", ["resources.rollout_workers=2", "resources.rollout_cpus=1.5"]),
        ("demo.yaml", ["resources.colocate=true", "resources.learner_cpus=0.5"]),
    ],
    ids=["judge", "colocated"],
)
def test_ray_grants_each_actor_exactly_the_planned_request(config, overrides, monkeypatch):
    import ray

    from dist_ft.cluster.nodes import cluster_nodes
    from dist_ft.config import load_config
    from dist_ft.model.loading import resolve_model_path
    from dist_ft.recipes.plan import describe_plan
    from dist_ft.run.specs import actor_spec, cluster_for, component_specs, judge_spec

    # defined here, so Ray ships it by value (actors cannot import tests)
    def held(_self):
        """Inside an actor: what Ray granted it, and its placement-group bundle (Ray names a
        bundle's resources ``CPU_group_<index>_<pg id>``)."""
        import ray

        raw = ray._private.worker.global_worker.core_worker.resource_ids()
        bundles = {int(m.group(1)) for k in raw if (m := re.search(r"_group_(\d+)_", k))}
        return ray.get_runtime_context().get_assigned_resources(), (
            bundles.pop() if bundles else None
        )

    monkeypatch.chdir(ROOT)  # the RLAIF recipe names its constitution relative to the repo
    cfg = load_config(
        ROOT / "configs" / config,
        ["resources.mode=ray", "resources.ray_address=local", "run.wandb=disabled", *overrides],
    )
    wk, lk = component_specs(cfg, resolve_model_path(cfg.model.path, cfg.model.tiny))
    # what recipes.grpo.train builds: the real construction path
    cluster = cluster_for(cfg, wk, lk)
    try:
        nodes = cluster_nodes()
        planned = plan_actors(actor_spec(cfg, gpu=lk.device == "cuda"), nodes)
        assert cluster.requests == planned  # RayCluster placed from this very plan
        assert len(planned.of("judge")) == (1 if judge_spec(cfg) else 0)
        groups = {"judge": cluster.judges, "rollout": cluster.workers, "learner": cluster.learners}
        got = [
            granted(role, i, *ray.get(actor.__ray_call__.remote(held)))
            for role, actors in groups.items()
            for i, actor in enumerate(actors)
        ]
        assert got == list(planned.actors)
        if planned.bundles:
            table = ray.util.placement_group_table(cluster._pg)
            assert list(table["bundles"].values()) == [dict(b) for b in planned.bundles]
        # `dist-ft plan`, asked while the cluster runs, lists these requests, each placed
        text = describe_plan(cfg)
        for a in planned.actors:
            line = next(ln for ln in text.splitlines() if lists(ln, a))
            assert "UNSCHEDULABLE" not in line, text
    finally:
        cluster.shutdown()
    assert not ray.is_initialized()


def lists(line: str, a) -> bool:
    """Whether a `dist-ft plan` line is actor ``a``'s: its own, or the line of a run of like
    actors, "rollout[0..7]  asks 1 CPU each -> ... (8)"."""
    if a.describe() in line:
        return True
    m = re.search(rf"\b{a.role}\[(\d+)\.\.(\d+)\]\s+asks (.+) each -> ", line)
    return bool(m) and int(m[1]) <= a.index <= int(m[2]) and m[3] == a.describe_asks()
