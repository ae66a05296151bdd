"""The demo end to end, as a user runs it: the README's `make demo`, verbatim, in the checkout
(it writes runs/demo there, as it does for a user). Real DeepSpeed, real wandb (offline). Slow
(about a minute and a half), and CI runs it."""

import json
import subprocess

import torch
from readme import ROOT, readme_command
from safetensors.torch import load_file


def test_demo_reward_rises_and_outputs_are_written(tiny_path):
    out = ROOT / "runs" / "demo"  # the built-in run.output_dir, relative to where make runs
    r = subprocess.run(
        readme_command("make", "demo"), cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 600
    reward = [row["reward/mean"] for row in rows]
    first, last = sum(reward[:10]) / 10, sum(reward[-10:]) / 10
    # The bar the README promises. Seeds 0-4 rose by +0.52 to +0.89 (README), so the bar
    # holds with margin on any CPU's rounding, not on one machine's trajectory.
    assert last - first >= 0.3, (first, last)
    # ... and it holds at the end: no peak-and-decay. The last 50 steps are within 0.1 of the
    # best 50-step window (the old demo peaked at 0.62 and fell to 0.42-0.50).
    windows = [sum(reward[i : i + 50]) / 50 for i in range(len(reward) - 49)]
    assert windows[-1] >= max(windows) - 0.1, (max(windows), windows[-1])
    assert f"last 10 steps {last:.3f}" in r.stdout
    # the adapter alone, in HF save_pretrained format, loadable by peft onto the base model
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_path), out / "adapter"
    )
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert any(v.abs().sum() > 0 for v in loaded.values())  # trained, not the zero init
    assert (out / "reward.png").stat().st_size > 1000
    assert list((out / "wandb").glob("offline-run-*"))
    assert torch.isfinite(torch.tensor([row["loss"] for row in rows])).all()
