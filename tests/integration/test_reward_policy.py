"""Reward error policy on a real RolloutWorker and a real `dist-ft` run: counted, never NaN,
and the reason is printed once and named when the run stops (issue #9)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import build

from dist_ft.algos.grpo import group_advantages
from dist_ft.rewards import RewardError, RewardSet
from dist_ft.rollout import RolloutWorker

TESTS = Path(__file__).resolve().parents[1]
G = 8
# `reward_fns:NAME` loads from tests/; the caller's PYTHONPATH still comes after it.
PATHS = [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(PATHS)}


def worker(tiny_path, fn: str, policy: str, timeout: float = 30.0) -> RolloutWorker:
    _, wk, _ = build(
        tiny_path,
        f"reward.functions=[{{name: char_match}}, {{name: '{fn}'}}]",
        f"reward.on_error={policy}",
        f"reward.timeout_s={timeout}",
    )
    return RolloutWorker(wk)


def test_nan_reward_is_masked_and_groups_use_valid_samples_only(tiny_path, demo_prompts):
    batch = worker(tiny_path, "reward_fns:nan_on_odd", "mask").rollout(1, demo_prompts[:2], 0)
    odd = torch.arange(len(batch)) % 2 == 1
    assert torch.equal(batch.reward_errors[:, 1], odd)  # counted per function and sample
    assert not batch.reward_errors[:, 0].any()
    assert torch.equal(batch.valid, ~odd)
    assert torch.isfinite(batch.advantages).all()
    assert (batch.advantages[odd] == 0).all()
    # the valid samples' advantages are those of their group's valid samples alone
    valid_total = batch.rewards[~odd].sum(1).view(2, G // 2)
    expected = group_advantages(valid_total)
    torch.testing.assert_close(batch.advantages[~odd].view(2, G // 2), expected)
    assert not batch.loss_mask[odd].any()  # left out of the loss


def test_raising_reward_scored_zero_under_zero_policy(tiny_path, demo_prompts):
    batch = worker(tiny_path, "reward_fns:raises", "zero").rollout(1, demo_prompts[:2], 0)
    assert batch.reward_errors[:, 1].all() and batch.valid.all()
    torch.testing.assert_close(batch.reward_total, batch.rewards[:, 0])  # the failed term is 0
    assert torch.isfinite(batch.advantages).all()


def test_raising_reward_aborts_under_abort_policy(tiny_path, demo_prompts):
    w = worker(tiny_path, "reward_fns:raises", "abort")
    with pytest.raises(RewardError, match=r"reward_fns:raises.*ZeroDivisionError"):
        w.rollout(1, demo_prompts[:2], 0)


def test_hanging_reward_times_out_and_is_masked(tiny_path, demo_prompts):
    w = worker(tiny_path, "reward_fns:hangs", "mask", timeout=0.5)
    t0 = time.perf_counter()
    batch = w.rollout(1, demo_prompts[:2], 0)
    assert time.perf_counter() - t0 < 10
    assert batch.reward_errors[:, 1].all() and not batch.valid.any()
    assert (batch.advantages == 0).all()


# What a user sees for each way a reward can return the wrong thing, on a step of 8 samples.
WRONG_RETURNS = {
    "three_values": "returned 3 scores for 8 samples",
    "strings": "returned str 'abc' for sample 2, expected a number",
    "returns_none": "returned None for 8 samples",
    "scalar": "returned a float for 8 samples",
    "wrong_signature": "raised TypeError: wrong_signature() takes 1 positional argument but 3 "
    "were given",
}


@pytest.mark.parametrize("fn", WRONG_RETURNS)
def test_wrong_return_is_named_and_printed_once(fn, capsys):
    name = f"reward_fns:{fn}"
    rs = RewardSet([("char_match", 1.0, {}), (name, 1.0, {})])
    for _ in range(3):  # three steps of one run: one line, not three
        scores = rs.score(["p"] * 8, ["c"] * 8, ["c"] * 8)
    failed = [i == 2 for i in range(8)] if fn == "strings" else [True] * 8
    assert scores.errors_NK[:, 1].tolist() == failed and not scores.errors_NK[:, 0].any()
    assert scores.messages == {name: f"reward '{name}' {WRONG_RETURNS[fn]}"}
    printed = [line for line in capsys.readouterr().err.splitlines() if "reward error" in line]
    assert len(printed) == 1 and scores.messages[name] in printed[0]
    assert f"reward/errors/{name}" in printed[0]


def run_demo(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """A real `dist-ft demo` of a few steps, without the format warm-up."""
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("dist-ft")),
            "demo",
            "grpo.sft_warmup_steps=0",
            f"run.output_dir={out}",
            "run.wandb=disabled",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stop_line(stderr: str) -> str:
    """The CLI's one-line error: the last line of stderr."""
    return stderr.strip().splitlines()[-1]


def test_wrong_length_stops_a_mask_run_at_step_1_with_the_reason(tmp_path):
    out = tmp_path / "run"
    fn = "reward_fns:three_values"
    r = run_demo(out, f"reward.functions=[{{name: char_match}}, {{name: '{fn}'}}]", "run.steps=2")
    assert r.returncode == 1, r.stderr[-3000:]
    reason = f"reward '{fn}' returned 3 scores for 64 samples"
    assert r.stderr.count(f"reward error: {reason}") == 1
    assert "no sample left to train on" in stop_line(r.stderr) and reason in stop_line(r.stderr)
    (row,) = metrics(out)  # counted; no reward/mean, which would be NaN, and no step 2
    assert row[f"reward/errors/{fn}"] == 64 and "reward/mean" not in row
    assert "NaN" not in (out / "metrics.jsonl").read_text()


def test_wrong_signature_aborts_with_the_reason(tmp_path):
    fn = "reward_fns:wrong_signature"
    r = run_demo(
        tmp_path / "run",
        f"reward.functions=[{{name: char_match}}, {{name: '{fn}'}}]",
        "reward.on_error=abort",
        "run.steps=2",
    )
    assert r.returncode == 1, r.stderr[-3000:]
    reason = f"reward '{fn}' raised TypeError: wrong_signature() takes 1 positional argument"
    assert r.stderr.count(f"reward error: {reason}") == 1
    assert f"step 1: {reason}" in stop_line(r.stderr)


def test_error_rate_over_patience_stops_the_run_naming_the_function_and_reason(tmp_path):
    out = tmp_path / "run"
    r = run_demo(
        out,
        "reward.functions=[{name: char_match}, {name: 'reward_fns:raises'}]",
        "reward.on_error=zero",  # every sample stays trainable: only the streak stops the run
        "reward.max_error_rate=0.5",
        "reward.error_patience=2",
        "run.steps=20",
    )
    assert r.returncode == 1, r.stderr[-3000:]
    reason = "reward 'reward_fns:raises' raised ZeroDivisionError: user bug"
    assert r.stderr.count(f"reward error: {reason}") == 1  # two failing steps, printed once
    assert "error_patience" in stop_line(r.stderr) and reason in stop_line(r.stderr)
    rows = metrics(out)
    assert len(rows) == 2  # stopped at the second bad step, not at the 20th
    assert rows[0]["reward/errors/reward_fns:raises"] == 64


def test_a_run_whose_reward_never_worked_does_not_exit_0(tmp_path):
    """Shorter than reward.error_patience and scored 0 where it failed: before issue #9 this run
    exited 0. A plot that fails while finishing does not replace the error (nor stop shutdown)."""
    out = tmp_path / "run"
    (out / "reward.png").mkdir(parents=True)  # savefig will fail: IsADirectoryError
    fn = "reward_fns:returns_none"
    r = run_demo(
        out,
        f"reward.functions=[{{name: char_match}}, {{name: '{fn}'}}]",
        "reward.on_error=zero",
        "run.steps=2",
    )
    assert r.returncode == 1, r.stderr[-3000:]
    reason = f"reward '{fn}' returned None for 64 samples"
    assert r.stderr.count(f"reward error: {reason}") == 1
    assert f"never returned a valid score in 2 steps; {reason}" in stop_line(r.stderr)
    assert "finishing the run failed: IsADirectoryError" in r.stderr
    assert [row[f"reward/errors/{fn}"] for row in metrics(out)] == [64, 64]
    assert not (out / "adapter").exists()  # no final adapter that looks like a result
