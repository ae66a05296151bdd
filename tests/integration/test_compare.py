"""``dist-ft compare``: the base and the trained policy, greedy, scored by the run's rewards."""

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from dist_ft.model.loading import load_tokenizer
from dist_ft.recipes.compare import compare_run, complete
from dist_ft.rewards.rules import char_match

ROOT = Path(__file__).resolve().parents[2]


def test_compare_shows_what_training_changed(tiny_path, tmp_path):
    out = tmp_path / "run"
    train = [
        sys.executable, "-m", "dist_ft.cli", "train", "configs/demo.yaml",
        f"run.output_dir={out}", "run.steps=3", "grpo.sft_warmup_steps=5",
        "algo.prompts_per_step=4", "rollout.group_size=4", "run.wandb=disabled", "run.plot=false",
    ]  # fmt: skip
    subprocess.run(train, check=True, capture_output=True, cwd=ROOT)

    got = compare_run(out, max_prompts=12, samples=3)
    # "before" is the base model's own decoding, whatever dist_ft loaded
    tok = load_tokenizer(tiny_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    prompts = [f"{q}" for q in got.questions]  # the demo's plain template is "{prompt}"
    assert got.before.greedy == complete(base, tok, prompts, 8, batch=5)
    assert len(got.after.sampled) == 12 * 3
    # the format warm-up and 3 GRPO steps at lr 1e-3 changed what the policy says
    assert got.after.greedy != got.before.greedy
    # each completion is scored by the run's reward functions (char_match at weight 1), kept
    # in float32 (char_match's 1/7 is not exact there)
    for side in (got.before, got.after):
        want = char_match(prompts, side.greedy, got.answers)
        assert side.reward_greedy == pytest.approx(want, abs=1e-6)
        answers = [a for a in got.answers for _ in range(3)]
        want = char_match([], side.sampled, answers)
        assert side.reward_sampled == pytest.approx(want, abs=1e-6)

    r = subprocess.run(
        [sys.executable, "-m", "dist_ft.cli", "compare", str(out), "--prompts", "12"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == (out / "compare.md").read_text()
    assert r.stdout.startswith("Mean reward over 12 prompts: sampled (4 per prompt, temperature 1)")
    assert r.stdout.count("\n| Repeat ") == 8  # --show's default


def test_compare_plays_an_environment_runs_episodes(tmp_path):
    """An env run: each policy plays episodes through the run's environment; the answers are
    transcripts, the rewards episode returns, and the trained adapter is what plays "after"."""
    out = tmp_path / "run"
    train = [
        sys.executable, "-m", "dist_ft.cli", "train", "configs/env_calculator.yaml",
        f"run.output_dir={out}", "run.steps=2", "algo.prompts_per_step=2", "rollout.group_size=2",
        "rollout.max_new_tokens=6", "learner.lr=0.05", "run.wandb=disabled", "run.plot=false",
        # the tiny model never answers right: a length penalty beside the env's reward varies
        # within a group (completions end at EOS or at 6 tokens), so advantages are not all 0
        "reward.functions=[{name: length_penalty, kwargs: {max_chars: 3}}]",
    ]  # fmt: skip
    subprocess.run(train, check=True, capture_output=True, cwd=ROOT)

    got = compare_run(out, max_prompts=3, samples=2)
    for side in (got.before, got.after):
        assert side.greedy == [] and len(side.sampled) == len(side.reward_sampled) == 3 * 2
        # the env's return (1: the right final number) plus the penalty, in [-1, 0]
        assert all(-1.0 <= r <= 1.0 for r in side.reward_sampled)
    assert got.after.sampled != got.before.sampled  # 2 steps at lr 0.05 moved the policy
    r = subprocess.run(
        [sys.executable, "-m", "dist_ft.cli", "compare", str(out), "--prompts", "3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(episodes: transcripts below" in (out / "compare.md").read_text()
