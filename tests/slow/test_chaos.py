"""Rollout actors killed (SIGKILL) and stalled (SIGSTOP) mid-run, on a real private Ray cluster."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DIST_FT = str(Path(sys.executable).with_name("dist-ft"))
RECIPE = [
    "resources.mode=ray",
    "resources.ray_address=local",
    "resources.rollout_workers=2",
    "run.steps=6",
    "grpo.sft_warmup_steps=2",
    "run.deterministic=true",
    "run.wandb=disabled",
    "run.plot=false",
]


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def rollout_pids(out: Path) -> list[int]:
    return [a["pid"] for a in json.loads((out / "placement.json").read_text())["rollout"]]


def wait_for(cond, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"run ended early: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited; only its table entry is left
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def launch(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [DIST_FT, "demo", *RECIPE, f"run.output_dir={out}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rollout_actors_killed_at_steps_2_and_4_lose_nothing(tmp_path):
    ref, run = tmp_path / "fault_free", tmp_path / "chaos"
    proc = launch(ref)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-4000:]

    t0 = time.perf_counter()
    proc = launch(run)
    wait_for(lambda: (run / "placement.json").exists(), proc)
    pids = rollout_pids(run)
    for step, victim in ((2, pids[0]), (4, pids[1])):
        wait_for(lambda s=step: steps_logged(run) >= s - 1, proc)  # step s is under way
        os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    print(f"chaos run: {time.perf_counter() - t0:.1f} s")
    assert not any(alive(p) for p in pids)
    assert "issuing its" in err  # the lost shares were issued again, loudly

    # The ledger: every issued sample trained exactly once (6 steps x 8 prompts x 8).
    rows = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    ids = [tuple(s[:3]) for row in rows for s in row["samples"]]
    assert len(ids) == len(set(ids)) == 6 * 8 * 8
    assert {i[0] for i in ids} == set(range(1, 7))
    print(f"chaos ledger: {len(ids)} samples trained, 0 lost, 0 twice")
    # Deterministic mode: the same per-step losses as the fault-free run, exactly.
    assert losses(run) == losses(ref)


def test_a_rollout_actor_killed_mid_episode_loses_nothing(tmp_path):
    """Multi-turn episodes (tests/envs_toy.py: Relay, 3 turns, each env step 0.2 s, so a
    worker's rollout is ~5 s of episodes): a worker SIGKILLed during step 2 takes its live
    episodes with it, and its prompts are issued again; every sample trains exactly once."""
    run = tmp_path / "chaos_env"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # envs_toy
    episodes = [
        "env.name=envs_toy:Relay", "env.kwargs={turns: 3, delay_s: 0.2}", "reward.functions=[]",
        "grpo.sft_warmup_steps=0", "run.steps=3", "algo.prompts_per_step=4",
        "rollout.group_size=4", "rollout.max_new_tokens=4",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [DIST_FT, "demo", *RECIPE, *episodes, f"run.output_dir={run}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    wait_for(lambda: (run / "placement.json").exists(), proc)
    victim = rollout_pids(run)[0]
    wait_for(lambda: steps_logged(run) >= 1, proc)  # step 2's episodes are under way
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert "issuing its" in err
    rows = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    ids = [tuple(s[:3]) for row in rows for s in row["samples"]]
    assert len(ids) == len(set(ids)) == 3 * 4 * 4
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["env/episodes"] for m in metrics] == [16.0] * 3  # whole groups, none cut short
    assert [m["env/turns"] for m in metrics] == [48.0] * 3
    print(f"chaos ledger (episodes): {len(ids)} samples trained, 0 lost, 0 twice")


def test_stalled_rollout_actor_is_named_within_the_timeout(tmp_path):
    out = tmp_path / "stall"
    timeout_s = 45  # also bounds actor start-up (imports, model load) on a busy 2-core machine
    proc = launch(out, "run.steps=50", f"resources.actor_timeout_s={timeout_s}")
    wait_for(lambda: steps_logged(out) >= 2, proc)
    victim = rollout_pids(out)[1]
    os.kill(victim, signal.SIGSTOP)
    t0 = time.perf_counter()
    try:
        _, err = proc.communicate(timeout=timeout_s + 60)
    finally:
        os.kill(victim, signal.SIGCONT) if alive(victim) else None
    elapsed = time.perf_counter() - t0
    print(f"stall reported after {elapsed:.1f} s")
    assert proc.returncode == 1
    assert f"rollout worker 1 (pid {victim}" in err and "did not answer" in err
    assert elapsed < timeout_s + 60
    time.sleep(2)  # the raylet reaps its workers as the driver's Ray shuts down
    assert not alive(victim)


def test_an_aborted_rollout_actor_is_noticed_in_seconds_not_at_the_timeout(tmp_path):
    """SIGABRT (a native crash, "Mutex corrupt") on a rollout worker: its share is issued
    again with a line naming it, and the run goes on long before resources.actor_timeout_s."""
    out = tmp_path / "abort"
    proc = launch(out, "run.steps=8", "resources.actor_timeout_s=3600")
    wait_for(lambda: steps_logged(out) >= 2, proc)
    victim = rollout_pids(out)[1]
    done = steps_logged(out)
    os.kill(victim, signal.SIGABRT)
    t0 = time.perf_counter()
    wait_for(lambda: steps_logged(out) >= done + 2, proc, timeout=300)
    elapsed = time.perf_counter() - t0
    _, err = proc.communicate(timeout=600)
    print(f"SIGABRT: 2 more steps {elapsed:.1f} s after it")
    assert proc.returncode == 0, err[-4000:]
    assert f"rollout worker 1 (pid {victim} on node 127.0.0.1) died (" in err, err[-4000:]
    assert "issuing its" in err


def startup_error(tiny_path: str, *overrides: str, **kwargs) -> str:
    """The message a RayCluster whose actors do not all start within 30 s fails with, on a
    private Ray whose workers can import tests/generators.py."""
    import ray
    from support import build

    from dist_ft.cluster.placement import ActorSpec
    from dist_ft.cluster.ray import ActorTimeoutError, RayCluster

    _, wk, lk = build(tiny_path, "algo.prompts_per_step=2", *overrides)
    tests = str(Path(__file__).resolve().parents[1])
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": tests}},
    )
    try:
        with pytest.raises(ActorTimeoutError) as e:
            RayCluster(wk, lk, ActorSpec(1, 1, **kwargs), timeout_s=30)
        return str(e.value)
    finally:
        ray.shutdown()


def test_an_actor_that_cannot_be_placed_is_named_with_the_resource_missing(tiny_path):
    assert startup_error(tiny_path, rollout_gpus=1) == (
        "rollout[0] not placed: it asks 1 CPU + 1 GPU; no live node has 1 GPU (the largest "
        "node has 0): see `dist-ft plan` (30 s, resources.actor_timeout_s)"
    )


def test_an_actor_still_in_its_init_is_named_as_placed_and_starting(tiny_path):
    msg = startup_error(tiny_path, "rollout.generator=generators:SlowStart")
    assert msg.startswith("rollout[0] placed (pid "), msg
    assert msg.endswith(
        ") but still starting: its __init__ (imports, model load) has not "
        "returned; a busy or swapping node is slow, a hung one never returns "
        "(30 s, resources.actor_timeout_s)"
    )
