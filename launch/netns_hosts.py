#!/usr/bin/env python3
"""Several hosts on one machine: network namespaces on a private switch, each a Ray node.

    sudo python launch/netns_hosts.py up --hosts 3            # head h0 + rollout nodes h1, h2
    sudo python launch/netns_hosts.py exec h0 -- dist-ft train configs/demo.yaml \\
        resources.mode=ray resources.ray_address=10.213.0.1:6379 resources.rollout_workers=auto
    sudo python launch/netns_hosts.py drain h2                # its workers finish, then leave
    sudo python launch/netns_hosts.py partition h2            # its link down; `heal h2` up
    sudo python launch/netns_hosts.py down                    # every process, link and file

Each host is a network namespace ``NAME-hI`` with one address, ``SUBNET.(I+1)``, on a veth pair
whose other end is plugged into a bridge inside a namespace of its own (``NAME-sw``). The switch
has no link to the machine's own network, so traffic goes only between these hosts: nothing
reaches them from outside and nothing they send leaves (each host's default route points at the
switch so that Ray's node-address discovery finds the host's address, and what goes that way is
dropped there). Distinct addresses and network stacks, no shared loopback, a partition is a
link set down; the hosts still share this machine's filesystem, /dev/shm and process table.

``up`` starts a Ray head on h0 (``--head-cpus``, no ``rollout`` resource: the learners and the
driver's actors go there) and a Ray node on every other host with the ``rollout`` custom
resource (``--rollout-per-node`` worker slots, ``--node-cpus`` CPUs), all with token auth.
``add`` brings up one more rollout host and joins it to the running cluster; ``kill HOST``
SIGKILLs every process of a host (its Ray node dies as a crashed machine's would); ``drain
HOST`` tells Ray the host is about to go (``ray drain-node``, reason preemption: what a spot
node's notice would trigger), so that a run lets its workers there finish their prompts and
then takes them out of its fleet. The token
lives in ``/tmp/NAME-fleet/auth_token`` (0600, never printed); ``exec`` passes it to the command
through the environment. ``down`` kills every process in the namespaces, deletes them (their
veths go with them) and removes the state directory. ``up`` that fails part-way tears down
what it made. Needs root (``ip netns``) and iproute2.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RAY_PORT = 6379


@dataclass
class Fleet:
    """What ``up`` made, kept in ``STATE/hosts.json`` for the later commands."""

    name: str
    subnet: str
    hosts: list[str]  # host labels, h0 (head) first

    @property
    def state(self) -> Path:
        return state_dir(self.name)

    def netns(self, host: str) -> str:
        return f"{self.name}-{host}"

    def ip(self, host: str) -> str:
        net = ipaddress.ip_network(self.subnet)
        return str(net[int(host[1:]) + 1])

    @property
    def head_address(self) -> str:
        return f"{self.ip('h0')}:{RAY_PORT}"

    def env(self) -> dict[str, str]:
        """This machine's environment plus the cluster's token auth."""
        token = (self.state / "auth_token").read_text().strip()
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}

    def save(self) -> None:
        (self.state / "hosts.json").write_text(json.dumps(asdict(self)))


def state_dir(name: str) -> Path:
    return Path("/tmp") / f"{name}-fleet"


def load(name: str) -> Fleet:
    path = state_dir(name) / "hosts.json"
    if not path.exists():
        sys.exit(f"netns_hosts: no fleet named {name!r} is up ({path} does not exist)")
    return Fleet(**json.loads(path.read_text()))


def ip(*argv: str) -> None:
    r = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(argv)}: {r.stderr.strip()}")


def namespaces(name: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{name}-")]


def kill_namespace(netns: str) -> int:
    """SIGKILL every process in ``netns`` and wait for them to go; returns how many are left
    (0 unless one outlived the 30 s wait)."""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and not zombie(p)]
        time.sleep(0.1)
    return len(pids)


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def add_host(fleet: Fleet, host: str) -> None:
    """Namespace ``host`` with its address, plugged into the fleet's switch."""
    ns, sw = fleet.netns(host), fleet.netns("sw")
    # Interface names: at most 15 bytes (IFNAMSIZ), hence the name's 9-character limit.
    inner, outer = f"{fleet.name}{host}", f"{fleet.name}s{host[1:]}"
    ip("netns", "add", ns)
    ip("link", "add", inner, "type", "veth", "peer", "name", outer)
    ip("link", "set", inner, "netns", ns)
    ip("link", "set", outer, "netns", sw)
    ip("-n", sw, "link", "set", outer, "master", "br0")
    ip("-n", sw, "link", "set", outer, "up")
    prefix = ipaddress.ip_network(fleet.subnet).prefixlen
    ip("-n", ns, "addr", "add", f"{fleet.ip(host)}/{prefix}", "dev", inner)
    ip("-n", ns, "link", "set", inner, "up")
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "route", "add", "default", "dev", inner)


def ray_start(fleet: Fleet, host: str, args: argparse.Namespace) -> None:
    """``ray start`` inside ``host``'s namespace (its daemons stay there until ``down``)."""
    ray = str(Path(sys.executable).with_name("ray"))
    common = [
        *("--node-ip-address", fleet.ip(host)),
        *("--temp-dir", str(fleet.state / "ray")),
        *("--memory", str(args.memory_gib << 30)),
        *("--object-store-memory", str(args.object_store_mib << 20)),
        "--disable-usage-stats",
    ]
    if host == "h0":
        role = ["--head", "--port", str(RAY_PORT), "--include-dashboard=false"]
        role += ["--num-cpus", str(args.head_cpus)]
    else:
        role = ["--address", fleet.head_address, "--num-cpus", str(args.node_cpus)]
        role += ["--resources", json.dumps({"rollout": args.rollout_per_node})]
    r = subprocess.run(
        ["ip", "netns", "exec", fleet.netns(host), ray, "start", *role, *common],
        env=fleet.env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    if r.returncode:
        raise RuntimeError(f"ray start on {host}: {(r.stdout + r.stderr)[-2000:]}")


def up(args: argparse.Namespace) -> None:
    if namespaces(args.name) or state_dir(args.name).exists():
        sys.exit(f"netns_hosts: a fleet named {args.name!r} exists: `down --name {args.name}`")
    fleet = Fleet(args.name, args.subnet, [f"h{i}" for i in range(args.hosts)])
    fleet.state.mkdir(mode=0o700)
    token = fleet.state / "auth_token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(16))
    fleet.save()
    try:
        sw = fleet.netns("sw")
        ip("netns", "add", sw)
        ip("-n", sw, "link", "add", "br0", "type", "bridge")
        ip("-n", sw, "link", "set", "br0", "up")
        for host in fleet.hosts:
            add_host(fleet, host)
        for host in fleet.hosts:
            ray_start(fleet, host, args)
    except BaseException:
        teardown(args.name)
        raise
    print(json.dumps({"head": fleet.head_address, "hosts": {h: fleet.ip(h) for h in fleet.hosts}}))


def add(args: argparse.Namespace) -> None:
    fleet = load(args.name)
    host = f"h{1 + max(int(h[1:]) for h in fleet.hosts)}"
    fleet.hosts.append(host)
    fleet.save()
    add_host(fleet, host)
    ray_start(fleet, host, args)
    print(json.dumps({host: fleet.ip(host)}))


def link(args: argparse.Namespace, state: str) -> None:
    """The host's port on the switch down (a partition) or up (healed)."""
    fleet = load(args.name)
    ip("-n", fleet.netns("sw"), "link", "set", f"{fleet.name}s{args.host[1:]}", state)


# Prints the node ID of the live Ray node at an address (run on the head's host).
NODE_ID = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
live = [n for n in ray.nodes() if n["Alive"]]
print(next(n["NodeID"] for n in live if n["NodeManagerAddress"] == sys.argv[2]))
"""


def on_head(fleet: Fleet, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", fleet.netns("h0"), *argv],
        env=fleet.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def drain(args: argparse.Namespace) -> None:
    """``ray drain-node`` for the host's node (reason preemption, no deadline): Ray takes the
    node down itself once the actors on it are gone."""
    fleet = load(args.name)
    r = on_head(fleet, sys.executable, "-c", NODE_ID, fleet.head_address, fleet.ip(args.host))
    if r.returncode == 0:
        r = on_head(
            fleet, str(Path(sys.executable).with_name("ray")), "drain-node",
            "--address", fleet.head_address, "--node-id", r.stdout.split()[-1],
            "--reason", "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message", f"netns_hosts drain {args.host}",
        )  # fmt: skip
    if r.returncode:
        raise RuntimeError(f"drain {args.host}: {(r.stdout + r.stderr)[-2000:]}")


def teardown(name: str) -> None:
    # Processes first: a namespace that still holds one outlives `ip netns del`.
    for ns in namespaces(name):
        kill_namespace(ns)
    for ns in namespaces(name):
        subprocess.run(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(state_dir(name), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="dft", help="prefix of every namespace and link")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("up", "add"):
        p = sub.add_parser(command)
        if command == "up":
            p.add_argument("--hosts", type=int, default=3, help="h0 (head) + rollout hosts")
            p.add_argument("--subnet", default="10.213.0.0/24")
            p.add_argument("--head-cpus", type=int, default=3)
        p.add_argument("--node-cpus", type=int, default=2)
        p.add_argument("--rollout-per-node", type=int, default=1)
        p.add_argument("--memory-gib", type=int, default=4, help="Ray memory per node")
        p.add_argument("--object-store-mib", type=int, default=512)
    for command in ("kill", "drain", "partition", "heal"):
        sub.add_parser(command).add_argument("host")
    p = sub.add_parser("exec", help="run a command on a host, with the cluster's token")
    p.add_argument("host")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("down")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[a-z][a-z0-9]{0,8}", args.name):
        parser.error("--name: 1-9 lowercase letters and digits (interface names are short)")
    if args.command == "up":
        up(args)
    elif args.command == "add":
        add(args)
    elif args.command == "kill":
        kill_namespace(load(args.name).netns(args.host))
    elif args.command == "drain":
        drain(args)
    elif args.command in ("partition", "heal"):
        link(args, "down" if args.command == "partition" else "up")
    elif args.command == "exec":
        fleet = load(args.name)
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        argv_ = ["ip", "netns", "exec", fleet.netns(args.host), *cmd]
        os.execvpe("ip", argv_, fleet.env())
    else:
        teardown(args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
