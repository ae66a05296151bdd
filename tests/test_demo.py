"""The demo end to end, as a user runs it: a real `dist-ft` process, real DeepSpeed, real wandb
(offline). Slow (about a minute), and CI runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_reward_rises_and_outputs_are_written(tmp_path, tiny_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_ft.cli",
            "train",
            str(ROOT / "configs" / "demo.yaml"),
            f"run.output_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 600
    first = sum(row["reward/mean"] for row in rows[:10]) / 10
    last = sum(row["reward/mean"] for row in rows[-10:]) / 10
    assert last - first >= 0.3, (first, last)
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
