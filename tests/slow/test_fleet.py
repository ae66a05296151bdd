"""README's "Several hosts on one machine" recipe, run as written: `launch/netns_hosts.py up`
(a Ray head and rollout nodes in network namespaces on a private switch, each its own address),
`exec h0 -- dist-ft train ...` (the driver on the head's host), `down`; and an elastic run on
such hosts, rollout nodes joining, killed, partitioned and drained while it trains.

The commands are read from README.md. What the tests change, before the subcommand: `--name`
(the test's own namespaces, so that it never touches a fleet of the user's, and its `down` only
its own); after it: the run's length and output directory, and for the elastic run the host
count it starts with. Teardown runs whatever happens, and checks that it left no namespace,
link, process or file behind.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from readme import readme_command

from dist_ft.config import load_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCRIPT = ("python", "launch/netns_hosts.py")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and ip"
)


def ip_list(*argv: str) -> str:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=True).stdout


class Hosts:
    """This test's fleet: README lines of netns_hosts.py run under its own --name."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name, self.env = name, env
        self.addresses: dict[str, str] = {}

    def argv(self, line: list[str], *extra: str) -> list[str]:
        at = line.index(SCRIPT[1])
        return [sys.executable, line[at], "--name", self.name, *line[at + 1 :], *extra]

    def run(self, line: list[str], *extra: str, timeout: float = 600) -> str:
        argv = self.argv(line, *extra)
        r = subprocess.run(
            argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        print(f"$ {shlex.join(argv[1:])[:160]} -> {r.returncode}")
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        return r.stdout

    def up(self, *extra: str) -> None:
        out = self.run(readme_command(*SCRIPT, "up"), *extra, timeout=300)
        self.addresses = json.loads(out.splitlines()[-1])["hosts"]

    def do(self, command: str, *args: str) -> str:
        """A subcommand the README names in prose (add, kill, drain, partition, heal)."""
        return self.run([*SCRIPT, command, *args], timeout=300)


@pytest.fixture
def hosts():
    name = f"t{os.getpid() % 100000}"
    # tests/ on the path of every process: the run's driver and, through the Ray nodes that
    # `up` and `add` start, its workers (the elastic run paces its steps with reward_fns:pause)
    path = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": path}
    fleet = Hosts(name, env)
    try:
        yield fleet
    finally:
        fleet.run(readme_command(*SCRIPT, "down"), timeout=120)
    assert not [ns for ns in ip_list("netns", "list").split() if ns.startswith(f"{name}-")]
    assert f"{name}h" not in ip_list("link") and f"{name}s" not in ip_list("link")
    assert not Path(f"/tmp/{name}-fleet").exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"/tmp/{name}-fleet" not in ps  # every Ray daemon of the fleet names its temp dir


PACED = [  # about a second a step: room for nodes to come and go while it trains
    "run.plot=false",
    "reward.functions=[{name: char_match}, {name: 'reward_fns:pause'}]",
]


def wait_for(proc: subprocess.Popen, log: Path, out: Path, what: str, cond, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"run ended before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what}: {log.read_text()[-3000:]}"
        time.sleep(0.2)
    print(f"{what} by step {len(rows(out))}")


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("transport", ["object_store", "collective"])
def test_demo_trains_across_namespace_hosts(hosts, tmp_path, transport):
    """The README's train line on the head's host, with each weight transport, every sync read
    back: the learner on h0, one rollout worker on each rollout host, each at its own address."""
    hosts.up()
    out = tmp_path / "run"
    train = readme_command(*SCRIPT, "exec", "h0")
    extra = [
        "run.steps=3",
        f"resources.weight_transport={transport}",
        "rollout.read_back_every=1",
        f"run.output_dir={out}",
    ]
    hosts.run(train, *extra)
    placement = json.loads((out / "placement.json").read_text())
    a = hosts.addresses
    assert sorted(w["ip"] for w in placement["rollout"]) == sorted([a["h1"], a["h2"]])
    assert {learner["ip"] for learner in placement["learner"]} == {a["h0"]}
    logged = rows(out)
    assert [row["step"] for row in logged] == [1, 2, 3]
    assert all(row["fleet/workers"] == 2 for row in logged)
    assert all(row["rollout/worker1_samples_per_s"] > 0 for row in logged)


def test_rollout_nodes_join_die_partition_and_drain_mid_run(hosts, tmp_path):
    """One rollout host at the start. While the run trains: a second joins (its worker takes
    prompts only after a read-back full sync), the first is SIGKILLed, a third joins, the
    second is partitioned (link down, then healed), a fourth joins, the third is drained. The
    run finishes; every sample is trained once; the metrics count 3 joins, 2 losses, 1 drain;
    the drained worker's prompts were never issued again."""
    # Ray's GCS declares a node dead after its health checks fail: 5 x 3 s plus timeouts by
    # default (about a minute, measured); these make a partition cost seconds, not a minute.
    hosts.env.update(
        RAY_health_check_period_ms="1000",
        RAY_health_check_timeout_ms="1000",
        RAY_health_check_failure_threshold="3",
    )
    hosts.up("--hosts", "2")
    out, log = tmp_path / "run", tmp_path / "train.log"
    steps = 90
    overrides = [f"run.steps={steps}", f"run.output_dir={out}", *PACED]
    train = hosts.argv(readme_command(*SCRIPT, "exec", "h0"), *overrides)
    with log.open("w") as f:
        proc = subprocess.Popen(train, cwd=ROOT, env=hosts.env, stdout=f, stderr=subprocess.STDOUT)

    def count(text: str) -> int:
        return log.read_text().count(text)

    added: dict[str, str] = {}  # host -> address
    try:
        wait_for(proc, log, out, "step 2", lambda: len(rows(out)) >= 2)
        for host, event in [
            ("h2", "add"), ("h1", "kill"), ("h3", "add"), ("h2", "partition"),
            ("h4", "add"), ("h3", "drain"),
        ]:  # fmt: skip
            joins, losses = count("joined with the current weights"), count("leaves the fleet")
            if event == "add":
                address = added[host] = json.loads(hosts.do("add").splitlines()[-1])[host]
                wait_for(proc, log, out, f"{host} joined", lambda n=joins: count("joined with") > n)
                assert f"on node {address}) joined" in log.read_text()
            elif event == "drain":
                hosts.do("drain", host)
                wait_for(proc, log, out, f"{host} drained", lambda: count("drained and left") == 1)
            else:
                hosts.do(event, host)
                lost = lambda n=losses: count("leaves the fleet") > n  # noqa: E731
                wait_for(proc, log, out, f"{host} lost", lost)
                if event == "partition":
                    hosts.do("heal", host)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    logged = rows(out)
    assert [row["step"] for row in logged] == list(range(1, steps + 1))
    total = {k: sum(row[f"fleet/{k}"] for row in logged) for k in ("joins", "losses", "drained")}
    assert total == {"joins": 3, "losses": 2, "drained": 1}, total
    assert {row["fleet/workers"] for row in logged} >= {1.0, 2.0}
    # placement.json follows the fleet: h4's worker alone is left (h1 killed, h2 partitioned,
    # h3 drained)
    placement = json.loads((out / "placement.json").read_text())
    assert [a["ip"] for a in placement["rollout"]] == [added["h4"]], placement
    # The ledger: every issued sample trained exactly once.
    cfg = load_config(ROOT / "configs" / "demo.yaml", [])
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    ids = [tuple(s[:3]) for row in ledger for s in row["samples"]]
    assert len(ids) == len(set(ids)) == steps * cfg.samples_per_step
    # A drain wastes nothing: the drained worker's prompts were never issued again.
    drained = re.search(r"dist-ft: (rollout worker \d+) \(.*\) drained and left", text)
    assert drained, text[-3000:]
    assert f"{drained.group(1)} (" not in "".join(
        line.split("issuing its")[0] for line in text.splitlines() if "issuing its" in line
    )
    print(f"elastic run: {total}, {len(ids)} samples trained once")


def test_a_late_joiner_gets_the_current_weights_through_the_collective(hosts, tmp_path):
    """The collective transport, every sync read back: a rollout host that joins mid-run gets
    the current version through a broadcast group of its own first (fingerprint checked), then
    takes prompts, and the next sync makes the group of both workers."""
    hosts.up("--hosts", "2")
    out, log = tmp_path / "run", tmp_path / "train.log"
    overrides = [
        "run.steps=25",
        f"run.output_dir={out}",
        "resources.weight_transport=collective",
        "rollout.read_back_every=1",
        *PACED,
    ]
    train = hosts.argv(readme_command(*SCRIPT, "exec", "h0"), *overrides)
    with log.open("w") as f:
        proc = subprocess.Popen(train, cwd=ROOT, env=hosts.env, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(proc, log, out, "step 2", lambda: len(rows(out)) >= 2)
        address = json.loads(hosts.do("add").splitlines()[-1])["h2"]
        wait_for(proc, log, out, "h2 joined", lambda: "joined with" in log.read_text())
        assert f"on node {address}) joined with the current weights" in log.read_text()
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    logged = rows(out)
    assert sum(row["fleet/joins"] for row in logged) == 1
    assert logged[-1]["fleet/workers"] == 2  # both take prompts after the join
    assert logged[-1]["rollout/worker1_samples_per_s"] > 0
    # placement.json follows the fleet: the joiner is in it, on its host
    placement = json.loads((out / "placement.json").read_text())
    assert len(placement["rollout"]) == 2 and placement["rollout"][1]["ip"] == address
