"""Connecting to Ray (dist_ft.cluster.connect): a wrong or stale address fails in seconds with exit
2 and the address; a local Ray listens on loopback only and keeps its token private."""

import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support import stop_session

from dist_ft.cluster.connect import RayConnectError, check_gcs, protect_token_file

ROOT = Path(__file__).resolve().parents[2]
DIST_FT = [str(Path(sys.executable).with_name("dist-ft"))]
# Without the check, each of these retried the GCS for 10+ minutes. `plan` gets there in
# seconds; `train` first imports torch and builds the model (25 s on a busy 2-core machine).
BOUND_S = {"plan": 30, "train": 60}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_ft(*args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the CLI with no RAY_ADDRESS (it would win over the address under test)."""
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    r = subprocess.run(
        [*DIST_FT, *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("command", ["plan", "train"])
def test_unreachable_address_fails_fast_with_exit_2(command, tmp_path):
    r, took = dist_ft(
        command,
        "configs/demo.yaml",
        "resources.mode=ray",
        "resources.ray_address=127.0.0.1:1",
        f"run.output_dir={tmp_path}",
    )
    assert r.returncode == 2, r.stderr[-3000:]
    print(f"dist-ft {command} with an unreachable address: exit 2 after {took:.1f} s")
    assert took < BOUND_S[command]
    assert r.stderr.strip().splitlines()[-1] == (
        "dist-ft: error: Ray cluster at 127.0.0.1:1 (from resources.ray_address) is "
        "unreachable: connection refused. Check that `ray start --head` is running there, "
        "that the port is the GCS port it printed (6379 by default; the dashboard's 8265 is "
        "not it), and that no firewall blocks it; or use resources.ray_address=local for a "
        "private single-node Ray"
    )


def test_auto_names_the_stale_address_file_it_read(tmp_path):
    # Ray reads $RAY_TMPDIR/ray/ray_current_cluster; a private RAY_TMPDIR keeps /tmp/ray out.
    address = f"127.0.0.1:{closed_port()}"
    (tmp_path / "ray").mkdir()
    stale = tmp_path / "ray" / "ray_current_cluster"
    stale.write_text(address)
    r, took = dist_ft("plan", "configs/demo.yaml", "resources.mode=ray", RAY_TMPDIR=str(tmp_path))
    assert r.returncode == 2, r.stderr[-3000:]
    assert took < BOUND_S["plan"]
    assert (
        f"dist-ft: error: Ray cluster at {address} (from {stale}, left by the last `ray start` "
        "here, which may have stopped since) is unreachable: connection refused." in r.stderr
    )


def test_a_port_that_is_not_a_gcs_is_named_as_such():
    # Something listens (the kernel completes the TCP handshake) but never speaks gRPC, like
    # the dashboard's port given by mistake.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        t0 = time.perf_counter()
        with pytest.raises(RayConnectError, match="does not answer as a Ray GCS"):
            check_gcs(f"127.0.0.1:{port}", "resources.ray_address")
        assert time.perf_counter() - t0 < BOUND_S["plan"]


def test_token_file_is_created_and_kept_owner_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    protect_token_file()  # none yet: created 0600, in Ray's format
    assert token.stat().st_mode & 0o777 == 0o600
    assert len(token.read_text()) == 64 and set(token.read_text()) <= set("0123456789abcdef")
    token.write_text("t" * 64)
    token.chmod(0o644)  # as `ray get-auth-token --generate` or an older dist-ft left it
    protect_token_file()
    assert token.stat().st_mode & 0o777 == 0o600
    assert token.read_text() == "t" * 64  # tightened, not replaced


# dist-ft's local Ray in its own process, reporting every listening socket of the processes
# it started once the set has been stable for 3 s (the dashboard agent and the metrics
# exporters come up seconds after ray.init returns).
LOCAL_RAY = """
import json, time, psutil, ray
from dist_ft.cluster.connect import init_ray
init_ray("local", 2)
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
me, seen, stable = psutil.Process(), None, 0
for _ in range(60):
    now = set()
    for p in [me, *me.children(recursive=True)]:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    now.add((p.name(), c.laddr.ip, c.laddr.port))
        except psutil.Error:
            pass
    stable = stable + 1 if now == seen else 0
    seen = now
    if stable == 3:
        break
    time.sleep(1)
print("LISTEN " + json.dumps(sorted(seen)))
ray.shutdown()
"""


def loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # [::ffff:127.0.0.1]
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def test_local_ray_listens_on_loopback_only_and_keeps_its_token_private(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # A fresh HOME, so Ray creates the token; a short private RAY_TMPDIR (socket paths must
    # fit 107 bytes) so this Ray shares nothing with any other on the machine.
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    env.update(HOME=str(tmp_path), RAY_TMPDIR=ray_tmp)
    try:
        r = subprocess.run(
            [sys.executable, "-c", LOCAL_RAY],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    listening = json.loads(r.stdout.split("LISTEN ", 1)[1])
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the check saw Ray's own servers
    assert [s for s in listening if not loopback(s[1])] == []
    assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600


# A driver connecting through init_ray to an explicit HOST:PORT; what Ray prints is left out.
CONNECT = """
import sys, ray
from dist_ft.cluster.connect import RayConnectError, init_ray
try:
    init_ray(sys.argv[1], 1)
except RayConnectError as e:
    print(f"REFUSED {e}")
else:
    print(f"CPUS {ray.cluster_resources()['CPU']:g}")
    ray.shutdown()
"""


def test_explicit_address_connects_or_says_a_token_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    env.update(HOME=str(tmp_path), RAY_TMPDIR=ray_tmp)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    address = f"127.0.0.1:{closed_port()}"
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            *("start", "--head", "--port", address.split(":")[1], "--num-cpus", "1"),
            *("--include-dashboard=false", "--disable-usage-stats"),
        ],
        env={**env, **auth},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its daemons keep this session: stop_session finds them
    )
    try:
        assert head.wait(timeout=180) == 0

        def driver(extra: dict[str, str]) -> str:
            r = subprocess.run(
                [sys.executable, "-c", CONNECT, address],
                cwd=ROOT,
                env={**env, **extra},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 0, r.stderr[-3000:]
            assert f"dist-ft: Ray cluster at {address} (from resources.ray_address)" in r.stderr
            return r.stdout.strip().splitlines()[-1]

        assert driver(auth) == "CPUS 1"
        assert driver({}) == (
            f"REFUSED Ray cluster at {address} (from resources.ray_address) refused: it "
            "requires an auth token this process does not send. Set RAY_AUTH_MODE=token and "
            "give the cluster's token (`ray get-auth-token` on the head prints it) as "
            "RAY_AUTH_TOKEN or in ~/.ray/auth_token"
        )
    finally:
        stop_session(head.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
