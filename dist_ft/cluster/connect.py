"""Connecting to Ray: a private single-node Ray kept on loopback, or an existing cluster that is
checked to be alive within seconds, so a wrong or stale address fails with a message instead
of Ray's endless GCS retries.

Relies on Ray 2.60 internals named where used; tests/integration/test_ray_connect.py pins each
behaviour.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import sys
from pathlib import Path

from dist_ft.config import ConfigError

# Seconds to wait for a TCP connect and then a gRPC handshake with the GCS. A live GCS answers
# in milliseconds even across a datacenter; without this bound ray.init retries for 10+ min.
CONNECT_TIMEOUT_S = 5.0

# Every actor's process first keeps the libraries' routine chatter out, as the CLI does in the
# driver (the actors' output reaches the driver's log). dist_ft is importable wherever its
# actors run, so the hook is too.
QUIET_ACTORS = {"worker_process_setup_hook": "dist_ft.cli.quiet_third_party"}


class RayConnectError(ConfigError):
    """No Ray cluster answers at the configured or discovered address. A ConfigError, so the
    CLI exits 2 with the message: the fix is in the address or the cluster, not the run."""


def init_ray(address: str, num_cpus: float) -> None:
    """Connect to ``address``; ``"local"`` starts a private single-node Ray (never attaching to
    another cluster on this machine), without a dashboard, on loopback only, with at least
    ``num_cpus`` CPU slots (what the actors ask for, from ``placement.plan_actors``) even on a
    machine with fewer cores. Any other address (``"auto"`` or HOST:PORT) must answer as a Ray
    GCS within seconds, else RayConnectError."""
    import ray

    if address == "local":
        protect_token_file()
        # Ray 2.60 picks a node IP by routing towards 8.8.8.8, and then every gRPC server, the
        # dashboard agent and two Prometheus exporters (no auth) listen on all interfaces. Its
        # node IP is 127.0.0.1, and all of them bind there, only in its macOS/Windows mode
        # (ENABLE_RAY_CLUSTER False, read when ray.init starts the node). A private one-node
        # Ray needs no other interface; scoped so a later connect to a real cluster is unchanged.
        from ray._private import ray_constants

        cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, math.ceil(num_cpus)),
                include_dashboard=False,
                runtime_env=QUIET_ACTORS,
            )
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        return
    target, source = check_address(address)
    print(f"dist-ft: Ray cluster at {target} (from {source})", file=sys.stderr)
    # RAY_ADDRESS wins over ray.init's own discovery, so Ray connects to the address checked
    # above; the argument stays as set because Ray reads a local token file (and turns token
    # auth on) only for "auto", never for an explicit address.
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = target
    try:
        # Ray merges this with a `ray job submit` job's own runtime env (their keys differ)
        ray.init(address=address, runtime_env=QUIET_ACTORS)
    except ConnectionError as e:  # the GCS answered, then refused us (after ~20 s of retries)
        why = str(e)
        if "InvalidAuthToken" in str(e.__cause__):
            why = (
                "it requires an auth token this process does not send. Set RAY_AUTH_MODE=token "
                "and give the cluster's token (`ray get-auth-token` on the head prints it) as "
                "RAY_AUTH_TOKEN or in ~/.ray/auth_token"
            )
        raise RayConnectError(f"Ray cluster at {target} (from {source}) refused: {why}") from e
    finally:
        if saved is None:
            del os.environ["RAY_ADDRESS"]
        else:
            os.environ["RAY_ADDRESS"] = saved


def check_address(address: str) -> tuple[str, str]:
    """The GCS address for ``address`` (``"auto"`` or HOST:PORT) and where it came from, once a
    Ray GCS has answered there; else RayConnectError within seconds. Cheap enough (no Ray
    start, no model) to run before training's imports."""
    target, source = resolve_address(address)
    check_gcs(target, source)
    return target, source


def resolve_address(address: str) -> tuple[str, str]:
    """The GCS address to connect to for ``address`` (``"auto"`` or HOST:PORT), and where it
    came from.

    ``RAY_ADDRESS`` wins, as in ``ray.init``. For ``"auto"`` the file the last ``ray start`` on
    this machine wrote (``$RAY_TMPDIR/ray/ray_current_cluster``, default /tmp) comes next, then
    a GCS process running here if there is exactly one. (Ray 2.60's own "auto" prefers a single
    running GCS over that file, which on a shared machine is someone else's cluster.)
    """
    from ray._common.utils import get_ray_address_file
    from ray._private.services import find_gcs_addresses

    if env := os.environ.get("RAY_ADDRESS"):
        return env, "the RAY_ADDRESS environment variable"
    if address != "auto":
        return address, "resources.ray_address"
    file = Path(get_ray_address_file(None))
    if file.is_file() and (last := file.read_text().strip()):
        return last, f"{file}, left by the last `ray start` here, which may have stopped since"
    running = sorted(find_gcs_addresses())
    if len(running) == 1:
        return running[0], "the one Ray GCS process running on this machine"
    found = f"Ray GCS processes at {', '.join(running)}" if running else "no Ray GCS process"
    raise RayConnectError(
        f"resources.ray_address=auto: RAY_ADDRESS is unset, {file} does not exist and this "
        f"machine runs {found}. Start a cluster with `ray start --head`, pass its address as "
        "resources.ray_address=HOST:PORT, or use resources.ray_address=local for a private "
        "single-node Ray"
    )


def check_gcs(address: str, source: str) -> None:
    """Raise RayConnectError unless a Ray GCS answers at ``address`` (HOST:PORT) within
    ``CONNECT_TIMEOUT_S``: a TCP connect, then a gRPC handshake (which needs no auth token)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not (sep and host and port.isdigit()):
        raise RayConnectError(
            f"Ray address {address!r} (from {source}) is not HOST:PORT (a head node's GCS "
            "address, e.g. 10.0.0.5:6379, as `ray start --head` prints it), 'auto' or 'local'"
        )
    host = host.strip("[]")
    where = f"Ray cluster at {host}:{port} (from {source})"
    check = (
        "Check that `ray start --head` is running there, that the port is the GCS port it "
        "printed (6379 by default; the dashboard's 8265 is not it), and that no firewall "
        "blocks it; or use resources.ray_address=local for a private single-node Ray"
    )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = (
            f"no answer within {CONNECT_TIMEOUT_S:g} s"
            if isinstance(e, TimeoutError)
            else (e.strerror or str(e)).lower()
        )
        raise RayConnectError(f"{where} is unreachable: {why}. {check}") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a plaintext handshake fails against a TLS GCS: the TCP connect is the check
    import grpc

    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        raise RayConnectError(
            f"{where} accepts connections but does not answer as a Ray GCS (no gRPC handshake "
            f"within {CONNECT_TIMEOUT_S:g} s). {check}"
        ) from None
    finally:
        channel.close()


def protect_token_file() -> None:
    """Make the token file a local ray.init() reads or creates readable by its owner alone.

    Ray 2.60 writes ~/.ray/auth_token with the process umask (0644 here) on the first local
    ray.init(), and whoever reads the token can run code on every cluster that uses it. So
    create it 0600 first, in Ray's format (64 hex characters), or tighten one that an earlier
    run or `ray get-auth-token --generate` left readable.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return  # auth disabled: Ray reads no token
    if os.environ.get("RAY_AUTH_TOKEN"):
        return  # the token is in the environment, not in a file
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(custom) if custom and Path(custom).is_file() else token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def token_path() -> Path:
    """Where Ray 2.60 keeps the token when RAY_AUTH_TOKEN_PATH is unset."""
    return Path.home() / ".ray" / "auth_token"
