"""bench/peer_trl.py still runs both frameworks and prints its figures (not asserted: timings
on a shared CI machine are noise). Tiny model, one run pair of 3 steps: about a minute."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_peer_trl_bench_reports_both_frameworks_and_their_ratio(tmp_path):
    table = tmp_path / "peer.md"
    work = str(tmp_path / "runs")
    args = ["--runs", "1", "--steps", "3", "--workdir", work, "--out", str(table)]
    r = subprocess.run(
        [sys.executable, str(BENCH / "peer_trl.py"), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert re.search(r"dist_ft / TRL samples/s: \*\*\d+\.\d\dx\*\*", out)
    assert re.search(r"dist_ft per step .*: rollout \d+\.\d+ s \(\d+%\), train", out)
    assert re.search(r"peak fp32 matmul, .*: \d+\.\d GFLOP/s", out)
    rows = re.findall(r"^\| (trl|dist_ft) \| \d+\.\d\d \|.*\| \d[\d,]* \|", table.read_text(), re.M)
    assert sorted(rows) == ["dist_ft", "trl"]
