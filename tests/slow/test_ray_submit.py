"""README's "On Ray" recipe, run as written: its `ray start --head` line, then its
`launch/ray_submit.sh` line, on a fresh HOME with no Ray variables set.

The commands are read from README.md, so the test fails when the README and what works drift
apart. Each run is kept to itself: a copy of the repo (its runs/demo is the recipe's output),
its own RAY_TMPDIR, and teardown that stops only the processes its `ray start` spawned;
`ray stop` would stop every Ray on the machine.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from readme import readme_command
from support import session_procs, stop_session

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# What ray_submit.sh leaves out of the job's working dir, so what a fresh checkout lacks.
NOT_COPIED = shutil.ignore_patterns(".venv", ".git", "runs", "wandb", "__pycache__")
# The recipe is the 600-step demo; 4 steps show the same plumbing.
SHORT = ["run.steps=4", "grpo.sft_warmup_steps=1", "run.wandb=disabled"]
# An earlier `resources.ray_address=local` run: dist-ft's own local Ray, which leaves
# ~/.ray/auth_token behind, and with it token auth on every later `ray start --head`.
EARLIER_LOCAL_RUN = (
    "import ray\nfrom dist_ft.cluster.connect import init_ray\ninit_ray('local', 1)\nray.shutdown()"
)


def in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("earlier_local_run", [False, True], ids=["fresh", "token-left"])
def test_readme_ray_recipe_runs_as_written(tmp_path, earlier_local_run):
    start = readme_command("ray", "start", "--head")
    submit = readme_command("launch/ray_submit.sh")
    stop = readme_command("launch/ray_stop.py")
    busy = [port for port in (6379, 8265) if in_use(port)]
    if busy:
        pytest.skip(f"another Ray holds {busy}, the default ports the README recipe uses")
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=NOT_COPIED)
    home = tmp_path / "home"
    home.mkdir()
    # Short: Ray's unix sockets live under it and their paths must fit in 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        HOME=str(home),
        RAY_TMPDIR=ray_tmp,
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
        # DeepSpeed's comm-op build cache; a fresh HOME would rebuild it (about 35 s).
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR")
        or str(Path.home() / ".cache" / "torch_extensions"),
    )
    sids: list[int] = []

    def run(argv: list[str], timeout: int) -> subprocess.CompletedProcess[str]:
        p = subprocess.Popen(
            argv,
            cwd=repo,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        sids.append(p.pid)
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    try:
        if earlier_local_run:
            r = run([sys.executable, "-c", EARLIER_LOCAL_RUN], timeout=180)
            assert r.returncode == 0, r.stderr[-3000:]
            assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
        t0 = time.perf_counter()
        r = run(start, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        head_sid = sids[-1]
        t1 = time.perf_counter()
        r = run([*submit, *SHORT], timeout=600)
        t2 = time.perf_counter()
        print(f"ray start {t1 - t0:.1f} s, ray_submit.sh {t2 - t1:.1f} s")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        # a token exists only after a local run; then `ray start` turned auth on
        assert ("sending the Ray auth token" in r.stderr) == earlier_local_run
        assert re.search(r"mean reward: first \d+ steps [\d.]+, last \d+ steps [\d.]+", r.stdout)
        out = Path(re.search(r"run outputs go to (.+) on the node", r.stderr).group(1))
        # under the submitting checkout, not Ray's copy: the README line's run.output_dir
        named = [a.split("=", 1)[1] for a in submit if a.startswith("run.output_dir=")]
        assert out == repo / named[-1]
        assert f"metrics: {out / 'metrics.jsonl'}" in r.stdout  # the job's log says the same
        # the actors' output reaches the job's log without the libraries' routine lines
        actors = re.findall(r"^.*\((?:RolloutWorker|LearnerHost) pid=.*$", r.stdout, re.M)
        assert actors == [], actors
        # inside the job, resources.ray_address=auto is the address Ray's job runner hands it
        assert re.search(
            r"Ray cluster at \S+ \(from the RAY_ADDRESS environment variable\)", r.stdout
        )
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [1, 2, 3, 4]
        # the README's teardown: every process the head's `ray start` left is gone
        head = session_procs(head_sid)
        assert head
        r = run(stop, timeout=120)
        assert r.returncode == 0, r.stderr
        assert [p for p in head if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    finally:
        for sid in sids:
            stop_session(sid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
