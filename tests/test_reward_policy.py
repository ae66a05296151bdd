"""Reward error policy on a real RolloutWorker and a real `dist-ft` run: counted, never NaN."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build

from dist_ft.algos.grpo import group_advantages
from dist_ft.rewards import RewardError
from dist_ft.rollout import RolloutWorker

TESTS = Path(__file__).resolve().parent
G = 8


def worker(tiny_path, fn: str, policy: str, timeout: float = 30.0) -> RolloutWorker:
    _, wk, _ = build(
        tiny_path,
        f"reward.functions=[{{name: char_match}}, {{name: '{fn}'}}]",
        f"reward.on_error={policy}",
        f"reward.timeout_s={timeout}",
    )
    return RolloutWorker(**wk)


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


@pytest.mark.slow
def test_error_rate_over_patience_stops_the_run_naming_the_function(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(
        [
            str(Path(sys.executable).with_name("dist-ft")),
            "demo",
            "reward.functions=[{name: char_match}, {name: 'reward_fns:raises'}]",
            "reward.max_error_rate=0.5",
            "reward.error_patience=2",
            "algo.sft_warmup_steps=0",
            "run.steps=20",
            f"run.output_dir={out}",
            "run.wandb=disabled",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "reward_fns:raises" in r.stderr and "error_patience" in r.stderr
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # stopped at the second bad step, not at the 20th
    assert '"reward/errors/reward_fns:raises": 64.0' in rows[0]
