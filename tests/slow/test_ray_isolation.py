"""The Ray tests leave other Ray clusters on the machine alone and ignore them (issue 25).

An unrelated Ray head (its own temp dir and ports, as a user's on a shared node) and a stale
discovery file are in place while the Ray tests run in their own pytest; they must pass, and the
head must still answer afterwards.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from support import free_port, session_procs, start_ray_node, stop_session

from dist_ft.cluster.connect import check_gcs

ROOT = Path(__file__).resolve().parents[2]
# Each Ray a test starts, one of each kind: a `ray.init(num_cpus=...)` fixture (which discovery
# turned into a connect to the stale address), RayCluster's own private Ray, and the multi-node
# fixture (which ran a global `ray stop --force`).
RAY_TESTS = [
    "tests/integration/test_sync.py::test_a_ray_sync_reads_back_every_nth_and_catches_a_lossy_load[object_store]",
    "tests/slow/test_ray.py::test_colocated_actors_share_placement_group_bundles",
    "tests/slow/test_ray.py::test_multi_node_grpo[2-lora]",
]


def start_head(temp_dir: str, sessions: list[int]) -> None:
    """`ray start --head` on free ports with its own temp dir, as a user on a shared node
    would (auth off: a user's head, not this test's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    start_ray_node(
        [
            *("--head", "--port", str(free_port()), "--temp-dir", temp_dir),
            *("--ray-client-server-port", str(free_port())),
            *("--dashboard-agent-listen-port", str(free_port())),
            # not Ray's default 8265, which `ray start` checks even without a dashboard and
            # another head on the machine (the README recipe's, a user's) may hold
            *("--dashboard-port", str(free_port())),
            *("--num-cpus", "1", "--include-dashboard=false", "--disable-usage-stats"),
            *("--memory", str(1 << 30), "--object-store-memory", str(256 << 20)),
        ],
        sessions,
        {**env, "RAY_AUTH_MODE": "disabled"},
    )


def head_daemons(sid: int) -> tuple[list[psutil.Process], str]:
    """The processes of the head started in session ``sid``, and its GCS address."""
    daemons = session_procs(sid)
    gcs = next(p for p in daemons if p.name() == "gcs_server")
    args = dict(a.lstrip("-").split("=", 1) for a in gcs.cmdline() if "=" in a)
    return daemons, f"{args['node-ip-address']}:{args['gcs_server_port']}"


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_ray_tests_pass_beside_an_unrelated_head_and_a_stale_address_file(tmp_path):
    # Short dirs: Ray's unix sockets live under them and their paths must fit in 107 bytes.
    head_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    # The tests' RAY_TMPDIR, holding the stale discovery file where Ray looks for it
    # ($RAY_TMPDIR/ray/ray_current_cluster; /tmp/ray/... by default, which is not written here
    # because other Ray users on this machine read it).
    tests_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    stale = Path(tests_tmp) / "ray" / "ray_current_cluster"
    stale.parent.mkdir()
    stale.write_text(f"127.0.0.1:{free_port()}\n")  # a cluster that has stopped since
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    sessions: list[int] = []
    try:
        start_head(head_tmp, sessions)
        daemons, address = head_daemons(sessions[0])
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *RAY_TESTS],
            cwd=ROOT,
            env={**env, "RAY_TMPDIR": tests_tmp},
            capture_output=True,
            text=True,
            timeout=1500,
        )
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert f"{len(RAY_TESTS)} passed" in r.stdout.splitlines()[-1]
        # the unrelated head: every daemon it had still runs, and its GCS still answers
        assert alive(daemons) == daemons
        check_gcs(address, "the unrelated head")
        assert stale.read_text().startswith("127.0.0.1:")  # not rewritten by a test either
    finally:
        for sid in sessions:
            stop_session(sid)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(tests_tmp, ignore_errors=True)


def test_ray_stop_script_stops_its_cluster_alone():
    """launch/ray_stop.py PORT (the README's teardown) stops the head at PORT, every process of
    it, and leaves another head running."""
    dirs = [tempfile.mkdtemp(prefix="r", dir="/tmp") for _ in range(2)]
    sessions: list[int] = []
    try:
        for d in dirs:
            start_head(d, sessions)
        (mine, address), (other, _) = head_daemons(sessions[0]), head_daemons(sessions[1])
        r = subprocess.run(
            [sys.executable, str(ROOT / "launch" / "ray_stop.py"), address.rpartition(":")[2]],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("ray_stop: stopped ")
        assert alive(mine) == [] and alive(other) == other
    finally:
        for sid in sessions:
            stop_session(sid)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
