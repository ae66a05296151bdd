"""`launch/slurm/dist_ft.sbatch` on a real one-node SLURM cluster (munged, slurmctld and slurmd
from Debian's slurm-wlm and munge packages, which .ci/run installs), submitted with the README's
own sbatch line so the two cannot drift apart."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SBATCH_SCRIPT = "launch/slurm/dist_ft.sbatch"
# Daemons live in sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
SLURM_BINS = (
    *("munged", "mungekey", "runuser", "slurmctld", "slurmd"),
    *("sbatch", "scontrol", "scancel", "sinfo", "squeue"),
)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
# What srun says when a task it runs dies of a signal or an exit code. (Slurm still prints
# "slurmstepd: error: *** STEP <id> ON <node> CANCELLED" for the Ray step it is asked to
# SIGTERM: any SIGTERM sent to a step is reported so.)
STEP_ERROR = r"^srun: error:|Killed|Exited with exit code"
REWARD_LINE = re.compile(r"mean reward: first \d+ steps [\d.]+, last \d+ steps [\d.]+")


def readme_sbatch_lines() -> list[list[str]]:
    """Every `sbatch ...` command in README.md, as argv: continuation lines joined, a trailing
    comment dropped."""
    lines = (ROOT / "README.md").read_text().replace("\\\n", " ").splitlines()
    return [shlex.split(s, comments=True) for s in map(str.strip, lines) if s.startswith("sbatch ")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_processes(job_id: int, ray_tmp: str | None) -> list[str]:
    """Live processes of a job: everything started inside it carries SLURM_JOB_ID in its
    environment (Ray workers too, whose command lines setproctitle rewrites), and Ray's own
    daemons name the job's temp dir. Other Ray clusters on this machine match neither."""
    env_marker = f"SLURM_JOB_ID={job_id}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile, or a kernel thread
            continue
        if env_marker in env or (ray_tmp and ray_tmp in cmd):
            found.append(f"{proc.name}: {cmd[:160]}")
    return found


@dataclass
class Job:
    id: int
    dir: Path  # holds the job's output file and its run.output_dir

    @property
    def output(self) -> Path:
        return self.dir / f"slurm-{self.id}.out"

    def log(self) -> str:
        return self.output.read_text() if self.output.exists() else "(no output yet)"

    def ray_tmp(self) -> str | None:
        """The Ray temp dir the script reports for this job."""
        m = re.search(r"temp dir (\S+)", self.log())
        return m.group(1) if m else None


@dataclass
class Slurm:
    env: dict[str, str]
    dir: Path
    jobs: list[Job] = field(default_factory=list)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=check
        )

    def submit(self, *overrides: str) -> Job:
        """The README's first sbatch line, verbatim, from the repo root, with ``overrides``
        appended after its config (where the README says they go), run.output_dir first. The
        output file goes to the job's dir through SBATCH_OUTPUT, sbatch's own variable for
        --output, so the command line stays the README's."""
        argv = readme_sbatch_lines()[0]
        d = Path(tempfile.mkdtemp(prefix="job-", dir=self.dir))
        r = subprocess.run(
            [*argv, f"run.output_dir={d / 'run'}", "run.wandb=disabled", *overrides],
            env={**self.env, "SBATCH_OUTPUT": str(d / "slurm-%j.out")},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, f"{shlex.join(argv)} failed:\n{r.stdout}{r.stderr}"
        job = Job(int(re.search(r"Submitted batch job (\d+)", r.stdout).group(1)), d)
        self.jobs.append(job)
        return job

    def state(self, job: Job) -> str:
        out = self.run("scontrol", "show", "job", "-o", str(job.id)).stdout
        return re.search(r"JobState=(\S+)", out).group(1)

    def wait(self, job: Job, states: set[str], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (state := self.state(job)) not in states and time.monotonic() < deadline:
            time.sleep(2)
        assert state in states, (
            f"job {job.id} is {state} after {timeout_s:.0f} s, not {states}\n{job.log()[-6000:]}"
        )
        return state


@pytest.fixture(scope="module")
def slurm() -> Iterator[Slurm]:
    """A one-node cluster on loopback (CPUs=2, like the machines CI runs on) with its own munge
    socket, key, ports and state dirs, so it touches no other SLURM or munge on the machine."""
    missing = [b for b in SLURM_BINS if not shutil.which(b, path=SEARCH_PATH)]
    if missing:
        pytest.skip(
            f"SLURM is not installed ({', '.join(missing)} missing): .ci/run installs it "
            "with `apt-get install -y slurm-wlm munge`"
        )
    if os.geteuid() != 0:
        pytest.skip("slurmd and munged (as the munge user) need root")
    which = {b: shutil.which(b, path=SEARCH_PATH) for b in SLURM_BINS}
    # Not pytest's tmp_path: another pytest session on this machine may prune that while the
    # daemons still write here.
    d = Path(tempfile.mkdtemp(prefix="dist_ft-slurm-"))
    # munged wants a socket dir owned by its user that others may traverse but not list.
    mdir = Path(tempfile.mkdtemp(prefix="dist_ft-munge-"))
    shutil.chown(mdir, "munge", "munge")
    mdir.chmod(0o711)
    sock = mdir / "munge.sock"
    conf = d / "slurm.conf"
    conf.write_text(
        f"""\
ClusterName=distft
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
# Random first id: job ids name the job's Ray ports and temp dir, which must not repeat those
# of an earlier run of these tests on this machine.
FirstJobId={secrets.randbelow(10**6) + 10**5}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
    )
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    env = {
        **os.environ,
        "SLURM_CONF": str(conf),
        # As a user who activated the venv: sbatch exports this PATH into the job.
        "PATH": os.pathsep.join([str(BIN), SEARCH_PATH]),
    }
    env.pop("SLURM_JOB_ID", None)  # in case these tests themselves run inside a SLURM job
    as_munge = ["runuser", "-u", "munge", "--"]
    daemons: list[subprocess.Popen[bytes]] = []
    cluster = None

    def start(name: str, argv: list[str]) -> None:
        with open(d / f"{name}.out", "wb") as log:
            daemons.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))

    try:
        subprocess.run(
            [*as_munge, which["mungekey"], "--create", f"--keyfile={mdir}/munge.key"], check=True
        )
        start(
            "munged",
            [*as_munge, which["munged"], "--foreground", f"--socket={sock}",
             f"--key-file={mdir}/munge.key", f"--pid-file={mdir}/munged.pid",
             f"--log-file={mdir}/munged.log", f"--seed-file={mdir}/munged.seed"],
        )  # fmt: skip
        for _ in range(50):
            if sock.exists():
                break
            time.sleep(0.2)
        start("slurmctld", [which["slurmctld"], "-D", "-f", str(conf)])
        start("slurmd", [which["slurmd"], "-D", "-f", str(conf), "-N", "localhost"])
        cluster = Slurm(env, d)
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            r = cluster.run("sinfo", "--noheader", "--format=%T", check=False)
            if (state := r.stdout.strip()) == "idle":
                break
            time.sleep(1)
        logs = "\n".join((d / f"{n}.out").read_text() for n in ("slurmctld", "slurmd"))
        assert state == "idle", f"node is {state!r}, not idle\n{logs[-4000:]}"
        yield cluster
    finally:
        try:
            # Jobs first, so their steps and Ray go down through slurmd while it still runs.
            if cluster:
                cluster.run("scancel", "--user=root", check=False)
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    r = cluster.run("squeue", "--noheader", "--format=%i", check=False)
                    if r.returncode or not r.stdout.strip():
                        break
                    time.sleep(2)
        finally:
            for p in reversed(daemons):
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for job in cluster.jobs if cluster else []:
                if ray_tmp := job.ray_tmp():
                    shutil.rmtree(ray_tmp, ignore_errors=True)
            shutil.rmtree(mdir, ignore_errors=True)
            shutil.rmtree(d, ignore_errors=True)


def test_readme_sbatch_line_completes_and_leaves_no_ray(slurm):
    start = time.monotonic()
    job = slurm.submit("run.steps=3", "grpo.sft_warmup_steps=1")
    state = slurm.wait(job, FINAL_STATES, 8 * 60)
    log = job.log()
    assert state == "COMPLETED", log[-6000:]
    assert REWARD_LINE.search(log), log[-3000:]
    assert len((job.dir / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    ray_tmp = job.ray_tmp()
    assert ray_tmp and str(job.id) in ray_tmp, log[:2000]
    # Ray ran with that temp dir (the script's --temp-dir), and nothing of it is left
    assert "Ray runtime started" in log, log[:3000]
    assert not Path(ray_tmp).exists(), sorted(p.name for p in Path(ray_tmp).iterdir())
    assert job_processes(job.id, ray_tmp) == []
    # A job that worked ends without srun errors: its Ray steps are stopped, not killed
    errors = [line for line in log.splitlines() if re.search(STEP_ERROR, line)]
    assert errors == [], log[-4000:]
    assert "dist_ft: Ray stopped" in log
    print(f"sbatch -> COMPLETED in {time.monotonic() - start:.0f} s")


def test_scancel_mid_run_stops_the_job_and_its_ray(slurm):
    job = slurm.submit()  # the demo's 600 steps: still running when cancelled
    metrics = job.dir / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 8 * 60
    # Training under way: Ray is up, its actors placed, a step logged.
    while not (metrics.exists() and metrics.read_text().strip()):
        assert slurm.state(job) in {"PENDING", "RUNNING"}, job.log()[-6000:]
        assert time.monotonic() < deadline, job.log()[-6000:]
        time.sleep(2)
    ray_tmp = job.ray_tmp()
    running = job_processes(job.id, ray_tmp)
    # The check after scancel would pass vacuously if it could not see the job's Ray at all.
    assert any(ray_tmp in p for p in running) and any("ray::" in p for p in running), running

    start = time.monotonic()
    slurm.run("scancel", str(job.id))
    state = slurm.wait(job, FINAL_STATES, 120)
    cancelled_s = time.monotonic() - start
    assert state == "CANCELLED", job.log()[-6000:]
    assert job_processes(job.id, ray_tmp) == []
    assert "dist_ft: Ray stopped" in job.log()
    print(f"scancel -> CANCELLED with no process left in {cancelled_s:.0f} s")


def test_a_config_too_big_for_the_grant_fails_fast_with_the_numbers(slurm):
    start = time.monotonic()
    # 2 rollout workers + 1 learner at 1 CPU each, on the 2 CPUs the README line asks for.
    job = slurm.submit("resources.rollout_workers=2")
    state = slurm.wait(job, FINAL_STATES, 3 * 60)
    log = job.log()
    assert state == "FAILED", log
    assert "need 3 CPUs" in log and "1 node(s) x 2 CPUs" in log, log
    assert "Ray head" not in log, log  # failed before starting anything
    assert job_processes(job.id, None) == []
    print(f"sbatch -> FAILED by the preflight in {time.monotonic() - start:.0f} s")


def sbatch_defaults() -> dict[str, str]:
    text = (ROOT / SBATCH_SCRIPT).read_text()
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.MULTILINE))


@pytest.mark.parametrize("argv", readme_sbatch_lines(), ids=shlex.join)
def test_readme_sbatch_lines_ask_for_what_their_config_needs(argv):
    """Without a cluster: each README line's config and overrides pass the preflight with the
    nodes and CPUs that line requests (the script's #SBATCH values where it names none)."""
    script = argv.index(SBATCH_SCRIPT)
    opts = {**sbatch_defaults()}
    flags = argv[1:script]
    for i, flag in enumerate(flags):
        if flag.startswith("--"):
            name, _, value = flag[2:].partition("=")
            opts[name] = value or flags[i + 1]
    config, *extra = argv[script + 1 :] or ["configs/demo.yaml"]
    r = subprocess.run(
        [sys.executable, "launch/slurm/preflight.py",
         "--nodes", opts["nodes"], "--cpus-per-node", opts["cpus-per-task"],
         "--gpus-per-node", opts.get("gpus-per-node", "0"),
         config, "resources.mode=ray", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
