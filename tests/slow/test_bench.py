"""The benchmark scripts still run and print their figures (the figures themselves are not
asserted: timings on a shared CI machine are noise)."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run(script: str, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_sync_bytes_bench_estimate_matches_a_real_export():
    out = run("sync_bytes.py")
    assert "matches the estimate" in out
    assert re.search(r"7B .* [\d,]+ +[\d,]+ +\d+\.\dx", out)


def test_rollout_scaling_bench_reports_both_actor_counts():
    out = run("rollout_scaling.py", "--steps", "1", "--prompts", "4")
    assert re.search(r"1 rollout actor : +\d+\.\d samples/s", out)
    assert re.search(r"2 rollout actors: +\d+\.\d samples/s +\(\d+\.\d\dx\)", out)


def test_payload_bytes_bench_reports_the_ratio_to_the_minimum():
    out = run("payload_bytes.py")
    assert re.search(r"payload: +\d+\.\d B/sample", out)
    assert re.search(r"ratio: +\d+\.\d\dx", out)


def test_sync_seconds_bench_reports_both_paths_for_lora_and_full():
    out = run("sync_seconds.py", "--layers", "2", "--repeats", "1")
    span = r"\d+\.\d{3} \[\d+\.\d{3}-\d+\.\d{3}\]"
    for method in ("lora", "none"):
        assert re.search(
            rf"^{method} +[\d,]+ +{span} +{span} +\d+\.\d\dx +\d+\.\d / +\d+\.\d$", out, re.M
        ), out
        assert re.search(
            rf"^{method} +read-back +new \d+\.\d{{3}} s +old \d+\.\d{{3}} s", out, re.M
        ), out


def test_peft_memory_bench_reports_a_row_per_method():
    out = run("peft_memory.py", "--methods", "lora,none", "--samples", "2", "--tokens", "16")
    mib = r"\d+\.\d"
    for method in ("lora", "none"):
        assert re.search(
            rf"^{method} +[\d,]+ +\d+\.\d{{3}}% +[\d,]+ +{mib} +([+-]{mib}|n/a) +({mib}|n/a) "
            rf"+{mib}$",
            out,
            re.M,
        ), out
    assert re.search(r"^none +[\d,]+ +100\.000% ", out, re.M), out
    assert re.search(r"^train peak as a share of full fine-tuning's: lora \d+%$", out, re.M), out


def test_sync_seconds_bench_compares_the_transports():
    out = run("sync_seconds.py", "--transports", "--layers", "2", "--repeats", "1", "--workers=2")
    span = r"\d+\.\d{3} \[\d+\.\d{3}-\d+\.\d{3}\]"
    for method in ("lora", "none"):
        assert re.search(rf"^{method} +2 +[\d,]+ +{span} +{span} +\d+\.\d\dx$", out, re.M), out


def test_fleet_scaling_bench_reports_each_fleet_and_the_cost_model():
    out = run(
        "fleet_scaling.py", "--workers", "1,2", "--steps", "3", "--warmup", "1", "--latency", "0.2"
    )
    for workers, samples in ((1, 8), (2, 16)):
        assert re.search(
            rf"^ +{workers} +{samples} +\d+\.\d\d( +\d+\.\d\d){{2}} +\d+\.\d{{3}} +\d+\.\d% "
            r"+\d+\.\d$",
            out,
            re.M,
        ), out
    # the 7B prediction: LoRA and full, each transport, 8/64/1,000 workers
    assert len(re.findall(r"^ +(8|64|1,000) +\d+\.\d ", out, re.M)) == 12, out
