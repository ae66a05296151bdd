"""`launch/ray_submit.sh` against a real local Ray cluster with its job API on loopback."""

import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_the_demo_config(tmp_path, monkeypatch):
    # The job runs `dist-ft` from this environment, as cluster nodes run their installed one.
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    dash = free_port()
    address = f"http://127.0.0.1:{dash}"
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    try:
        subprocess.run(
            [
                RAY,
                "start",
                "--head",
                "--port",
                str(free_port()),
                "--num-cpus",
                "4",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(dash),
                "--disable-usage-stats",
                "--memory",
                str(4 << 30),
                "--object-store-memory",
                str(1 << 30),
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
        out = tmp_path / "job"
        r = subprocess.run(
            [
                str(ROOT / "launch" / "ray_submit.sh"),
                "--address",
                address,
                "--no-wait",
                "configs/demo.yaml",
                "run.steps=4",
                "algo.sft_warmup_steps=1",
                "run.wandb=disabled",
                f"run.output_dir={out}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        job_id = re.search(r"(raysubmit_\w+)", r.stdout + r.stderr).group(1)
        deadline = time.monotonic() + 600
        status = ""
        while time.monotonic() < deadline:
            status = subprocess.run(
                [RAY, "job", "status", "--address", address, job_id],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            # `ray job status` prints e.g. "Job 'raysubmit_...' succeeded" when it is final
            if re.search(r"succeeded|failed|stopped", status, re.IGNORECASE):
                break
            time.sleep(3)
        logs = subprocess.run(
            [RAY, "job", "logs", "--address", address, job_id],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert re.search(r"succeeded", status, re.IGNORECASE), status + logs[-3000:]
        assert re.search(r"mean reward: first \d+ steps [\d.]+, last \d+ steps [\d.]+", logs)
        assert (out / "metrics.jsonl").exists()
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
