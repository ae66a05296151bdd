"""``dist-ft compare``: the base and the trained policy, greedy, scored by the run's rewards."""

import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM

from dist_ft.compare import compare_run, greedy
from dist_ft.models import load_tokenizer
from dist_ft.rewards.rules import char_match

ROOT = Path(__file__).resolve().parents[2]


def test_compare_shows_what_training_changed(tiny_path, tmp_path):
    out = tmp_path / "run"
    train = [
        sys.executable, "-m", "dist_ft.cli", "train", "configs/demo.yaml",
        f"run.output_dir={out}", "run.steps=3", "algo.sft_warmup_steps=5",
        "algo.prompts_per_step=4", "rollout.group_size=4", "run.wandb=disabled", "run.plot=false",
    ]  # fmt: skip
    subprocess.run(train, check=True, capture_output=True, cwd=ROOT)

    got = compare_run(out, max_prompts=12)
    # "before" is the base model's own greedy decoding, whatever dist_ft loaded
    tok = load_tokenizer(tiny_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    assert got.before == greedy(base, tok, got.prompts, 8, batch=5)
    # the format warm-up and 3 GRPO steps at lr 1e-3 changed what the policy says
    assert got.after != got.before
    # each completion is scored by the run's reward functions (char_match at weight 1)
    assert got.reward_after == char_match(got.prompts, got.after, got.answers)
    assert got.reward_before == char_match(got.prompts, got.before, got.answers)

    r = subprocess.run(
        [sys.executable, "-m", "dist_ft.cli", "compare", str(out), "--prompts", "12"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == (out / "compare.md").read_text()
    assert r.stdout.startswith("Mean reward over 12 prompts (greedy): before ")
    assert r.stdout.count("\n| Repeat ") == 8  # --show's default
