"""No socket of a run listens on every interface (issue 20, "An open port"): every listening
socket of the run's processes (the driver, and on a private Ray its GCS, raylet, agents and
actors, all descendants of the driver) is bound to loopback, sampled while the run trains."""

import ipaddress
import subprocess
import sys
import time
from pathlib import Path

import psutil

DIST_FT = str(Path(sys.executable).with_name("dist-ft"))
SHORT = ["run.steps=3", "grpo.sft_warmup_steps=1", "run.wandb=disabled", "run.plot=false"]


def listening(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``root`` and its
    descendants."""
    out = set()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            name = p.name()
            out |= {
                (name, c.laddr.ip, c.laddr.port)
                for c in p.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            }
        except psutil.Error:
            pass  # exited meanwhile
    return out


def run_and_watch(out: Path, *overrides: str) -> set[tuple[str, str, int]]:
    """Run the demo with ``overrides``; the union of its listening sockets, sampled every 0.2 s
    until it exits (with code 0)."""
    proc = subprocess.Popen(
        [DIST_FT, "demo", *SHORT, f"run.output_dir={out}", *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: set[tuple[str, str, int]] = set()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        seen |= listening(root)
        time.sleep(0.2)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    return seen


def wildcard(ip: str) -> bool:
    return ipaddress.ip_address(ip.split("%")[0]).is_unspecified


def test_a_debug_run_listens_on_loopback_only(tmp_path):
    seen = run_and_watch(tmp_path / "run")
    assert seen, "the learner's store was never seen listening"
    assert [s for s in seen if wildcard(s[1])] == []
    assert {ip for _, ip, _ in seen} == {"127.0.0.1"}


def test_a_private_ray_run_listens_on_loopback_only(tmp_path):
    seen = run_and_watch(
        tmp_path / "run",
        "resources.mode=ray",
        "resources.ray_address=local",
        "resources.rollout_workers=1",
        "resources.learners=2",  # two ranks: the store and gloo's pair sockets
    )
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet", "ray::LearnerHost"} <= names, seen
    assert [s for s in seen if wildcard(s[1])] == []
