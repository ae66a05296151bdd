import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import build
from transformers import AutoConfig

from dist_ft.cluster.placement import ActorSpec, plan_actors
from dist_ft.model.loading import load_policy
from dist_ft.model.spec import PeftMethod, PeftSpec
from dist_ft.model.weights import export_state, sync_bytes
from dist_ft.recipes.plan import placement_lines, predict_placement
from dist_ft.rollout import RolloutWorker
from dist_ft.wire.batch import ScoredBatch

ROOT = Path(__file__).resolve().parents[2]


def node(addr, **resources):
    return {"NodeManagerAddress": addr, "Resources": resources}


def placed(nodes, workers, learners, gpu):
    """Actor name -> predicted node address for ``workers`` rollout workers and ``learners``."""
    plan = plan_actors(ActorSpec(workers, learners, gpu=gpu), nodes)
    return {a.name: node for a, node in predict_placement(nodes, plan)}


def test_rollout_workers_go_where_the_rollout_resource_is():
    nodes = [
        node("10.0.0.1", CPU=4.0),
        node("10.0.0.2", CPU=4.0, rollout=2.0),
        node("10.0.0.3", CPU=4.0, rollout=2.0),
    ]
    where = placed(nodes, 4, 2, gpu=False)
    assert sorted(where[f"rollout[{i}]"] for i in range(4)) == ["10.0.0.2"] * 2 + ["10.0.0.3"] * 2
    assert where["learner[rank 0]"] == where["learner[rank 1]"] == "10.0.0.1"
    # more workers than `rollout` slots cannot be placed, and the plan says so
    assert placed(nodes, 5, 0, gpu=False)["rollout[4]"] == "UNSCHEDULABLE"
    assert set(placed([node("a", CPU=8.0)], 1, 1, gpu=True).values()) == {"UNSCHEDULABLE"}


def test_ten_thousand_rollout_workers_plan_in_seconds_and_a_few_lines():
    # issue 20: `dist-ft plan` with resources.rollout_workers=10000 printed one line per actor
    import time

    start = time.perf_counter()
    nodes = [node("10.0.0.1", CPU=2.0), node("10.0.0.2", CPU=2.0, rollout=2.0)]
    lines = placement_lines(predict_placement(nodes, plan_actors(ActorSpec(10_000, 1), nodes)))
    assert time.perf_counter() - start < 10
    assert lines == [
        "  rollout[0..1]      asks 1 CPU + 1 rollout each -> 10.0.0.2 (2)",
        "  rollout[2..9999]   asks 1 CPU + 1 rollout each -> UNSCHEDULABLE (9998)",
        "  learner[rank 0]    asks 1 CPU -> 10.0.0.1",
    ]


def test_payload_bound_holds_for_a_real_batch(tiny_path, demo_prompts):
    _, wk, _ = build(tiny_path, "grpo.beta=0.1")
    batch = RolloutWorker(wk).rollout(1, demo_prompts[:2], seed=0)
    g = len(batch) // len(batch.prompt_ids)
    widths = (batch.prompt_ids.shape[1], batch.episode_ids.shape[1], len(batch.reward_names))
    bound = ScoredBatch.bytes_per_sample(*widths, ref=True, group_size=g)
    # exact at the batch's own padded widths, up to rounding the per-group prompt to a byte
    assert bound - 1 < batch.nbytes / len(batch) <= bound


def test_plan_cli_reports_the_bytes_a_sync_really_sends(tiny_path):
    r = subprocess.run(
        [sys.executable, "-m", "dist_ft.cli", "plan", str(ROOT / "configs" / "demo.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "8 prompts x 8 completions = 64 samples per step" in r.stdout
    sync = int(re.search(r"learner -> rollout: ([\d,]+) bytes", r.stdout).group(1).replace(",", ""))
    model = load_policy(tiny_path, "float32", PeftSpec(), torch.device("cpu"))
    assert sync == sum(t.nbytes for t in export_state(model, adapter_only=True).values())


def test_plan_cli_predicts_the_step_on_each_fleet_size(tiny_path):
    def plan(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "dist_ft.cli", "plan", str(ROOT / "configs" / "demo.yaml")]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)

    r = plan("--fleet", "2,1000", "--link-gbps", "8", "--driver-ms-per-worker", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    sync = int(re.search(r"learner -> rollout: ([\d,]+) bytes", r.stdout).group(1).replace(",", ""))
    payload = int(re.search(r"<= ([\d,]+) bytes per sample", r.stdout).group(1).replace(",", ""))
    assert "object store sync" in r.stdout and "8 Gbit/s links, 3 driver ms" in r.stdout
    rows = {
        int(m[0].replace(",", "")): m[1:]
        for m in re.findall(r"^ +([\d,]+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) "
                            r"+([\d.]+) +([\d.]+ [KMGT]?B)$", r.stdout, re.M)
    }  # fmt: skip
    assert sorted(rows) == [2, 1000], r.stdout
    # at 8 Gbit/s (1e9 B/s) the store's sync is one copy per worker; the driver 3 ms each
    assert float(rows[1000][4]) == pytest.approx(1000 * sync / 1e9, abs=0.05)
    assert float(rows[1000][5]) == pytest.approx(3.0)
    total = 2 * 64 * payload + 1000 * sync  # the demo's 64 samples, in and out of the driver
    assert rows[1000][6] == f"{total / 1e6:.1f} MB"
    bad = plan("--fleet", "8,0")
    assert bad.returncode == 2 and "expected worker counts like 8,64,1000" in bad.stderr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", [m.value for m in PeftMethod])
def test_sync_bytes_predicts_every_methods_real_export(tiny_path, method, dtype):
    # the meta-device estimate `dist-ft plan` reports, against a real policy's sync
    spec = PeftSpec(method=PeftMethod(method))
    sizes = sync_bytes(AutoConfig.from_pretrained(tiny_path), spec, dtype)
    model = load_policy(tiny_path, dtype, spec, torch.device("cpu"))
    adapter_only = spec.method is not PeftMethod.NONE
    sent = sum(t.nbytes for t in export_state(model, adapter_only=adapter_only).values())
    assert (sizes["adapter"] if adapter_only else sizes["full"]) == sent
    base = load_policy(tiny_path, dtype, PeftSpec(method=PeftMethod.NONE), torch.device("cpu"))
    assert sizes["full"] == sum(t.nbytes for t in export_state(base, adapter_only=False).values())


def test_a_local_plan_describes_this_machine_as_it_is():
    """ray_address=local plans against this machine's cores, not a Ray sized to the request:
    what does not fit is UNSCHEDULABLE, and a note says the run would still start,
    oversubscribed. No Ray starts for it."""
    import os

    import ray

    from dist_ft.config import load_config
    from dist_ft.recipes.plan import describe_plan

    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        ["resources.mode=ray", "resources.ray_address=local", "resources.rollout_workers=8",
         "resources.learners=4"],
    )  # fmt: skip
    text = describe_plan(cfg)
    assert not ray.is_initialized()
    cores = os.cpu_count() or 1
    assert f"  node 127.0.0.1: {{'CPU': {float(cores)}" in text, text
    # 12 actors at 1 CPU each, first fit: those beyond the cores do not fit (CPUs only here)
    if not torch.cuda.is_available():
        # identical actors in a row share a line, "-> UNSCHEDULABLE (count)"
        counts = re.findall(r"-> UNSCHEDULABLE(?: \((\d+)\))?$", text, re.M)
        assert sum(int(c or 1) for c in counts) == max(0, 12 - cores), text
    note = (
        f"  CPU requests beyond this machine's {cores} cores: a ray_address=local run starts "
        f"anyway (its Ray gets 12 CPU slots), {12 / cores:.1f}x oversubscribed"
    )
    assert (note in text) == (cores < 12), text
