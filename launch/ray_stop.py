#!/usr/bin/env python3
"""Stop the Ray cluster whose GCS listens on PORT on this machine, and nothing else.

    launch/ray_stop.py [PORT]      # PORT: the head's GCS port, 6379 unless `ray start` was told

`ray stop` stops every Ray process on the machine, other users' and other jobs' clusters too.
This finds the GCS server holding PORT, reads its session directory (unique to that cluster,
named in the command line of its GCS, raylet and helpers; the Ray client server names the GCS
address instead) and stops exactly the processes that name it and their descendants (the
raylet's agents and workers rename themselves `ray::...`, which drops the session from their
command line): SIGTERM, then SIGKILL for any left after 10 s. Exit 1 when no Ray GCS of this
user listens on PORT.
"""

from __future__ import annotations

import contextlib
import sys

import psutil

GRACE_S = 10.0


def gcs_at(port: int) -> tuple[str, str] | None:
    """The session directory and address of the GCS server listening on ``port``, if one does."""
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] != "gcs_server":
            continue
        try:
            ports = {c.laddr.port for c in p.net_connections("tcp") if c.status == "LISTEN"}
        except psutil.Error:
            continue  # exited meanwhile, or another user's
        if port in ports:
            args = dict(a.lstrip("-").split("=", 1) for a in p.info["cmdline"] if "=" in a)
            return args["session-dir"], f"{args['node-ip-address']}:{port}"
    return None


def main(argv: list[str]) -> int:
    port = int(argv[0]) if argv else 6379
    found = gcs_at(port)
    if found is None:
        print(f"ray_stop: no Ray GCS of this user listens on port {port}", file=sys.stderr)
        return 1
    session, address = found
    # Its client server names the GCS address instead of the session directory.
    named = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(session in arg or arg == f"--address={address}" for arg in p.info["cmdline"] or [])
    ]
    found = {p.pid: p for p in named}
    for p in named:
        with contextlib.suppress(psutil.Error):  # exited meanwhile
            found.update({c.pid: c for c in p.children(recursive=True)})
    procs = list(found.values())
    for p in procs:
        with contextlib.suppress(psutil.Error):  # exited meanwhile
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=GRACE_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=GRACE_S)
    print(f"ray_stop: stopped {len(procs)} processes of the Ray cluster at port {port} ({session})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
