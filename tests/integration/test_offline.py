"""SFT and DPO on the GRPO learners: the DPO step's loss against the model's own logits, pairs
kept whole across micro-batches, the demos' learning (loss, held-out loss and generation
accuracy, preference accuracy), DPO with full fine-tuning and LoRA on ZeRO-0 and ZeRO-3, the
reference pass done once per pair, and the commands as a user runs them."""

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import build, dpo_batch

from dist_ft.algos.dpo import dpo_loss
from dist_ft.algos.settings import DPOLoss, DPOParams
from dist_ft.config import load_config
from dist_ft.learner import Learner
from dist_ft.recipes.sft_dpo import REFERENCE_FILE, train_offline

ROOT = Path(__file__).resolve().parents[2]
DIST_FT = str(Path(sys.executable).with_name("dist-ft"))
QUICK = ["run.wandb=disabled", "run.plot=false", "run.overwrite=true"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def sequence_sums(learner: Learner, batch) -> torch.Tensor:
    """[N] summed logprobs of each row's trained tokens, from the model's logits directly."""
    prompt_ids, prompt_mask = batch.sample_prompts()
    out = []
    with torch.no_grad():
        for i in range(len(batch)):
            p = prompt_ids[i][prompt_mask[i]].long()
            keep = batch.episode_mask[i] != 0
            e = batch.episode_ids[i][keep].long()
            logits = learner.module(input_ids=torch.cat([p, e])[None]).logits[0].float()
            logp = logits[len(p) - 1 : -1].log_softmax(-1).gather(-1, e[:, None]).squeeze(-1)
            out.append(float(logp[batch.episode_mask[i][keep] == 2].sum()))
    return torch.tensor(out)


@pytest.mark.parametrize("loss", [DPOLoss.SIGMOID, DPOLoss.IPO, DPOLoss.SIMPO])
def test_dpo_step_loss_equals_the_loss_of_the_models_own_logprobs(tiny_path, loss):
    """Learner.step(batch, DPO) reports the loss of algos/dpo.py applied to sequence logprobs
    computed here from the model's logits; 2 micro-batches (pairs kept whole) give the same
    update as 1."""
    params = DPOParams(loss=loss, beta=2.0 if loss is DPOLoss.SIMPO else 0.1)
    _, _, lk = build(tiny_path, "algo.prompts_per_step=4")
    batch = dpo_batch(tiny_path, 6)
    mask = batch.loss_mask
    out = []
    for micro in (1, 2):
        learner = Learner(replace(lk, dpo=params, micro_batches=micro))
        seq = sequence_sums(learner, batch)
        ref = (batch.ref_logprobs * mask).sum(-1)
        n = mask.sum(-1).float()
        expected, _ = dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], params, n[0::2], n[1::2])
        got = learner.step(batch, "dpo")
        assert got["loss"] == pytest.approx(float(expected), rel=1e-5)
        out.append(learner.export_weights())
    for name in out[0]:
        # Adam normalises: a float-rounding gradient difference moves a near-zero update
        torch.testing.assert_close(out[1][name], out[0][name], atol=5e-5, rtol=1e-4)


def test_sft_demo_loss_falls_and_held_out_accuracy_rises(tmp_path):
    """The demo's held-out rows carry answers: at each eval a rollout worker, synced to the
    learner's weights of that step, answers them and exact_match scores the answers. Seeds
    0-3 measured eval_accuracy 0.004-0.03 at step 10 and 0.54-0.77 at step 30."""
    cfg = load_config(
        ROOT / "configs" / "sft_demo.yaml",
        [*QUICK, "run.steps=30", f"run.output_dir={tmp_path}"],
    )
    summary = train_offline(cfg)
    rows = metrics(tmp_path)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert [r["eval_version"] for r in evals] == [10, 20, 30]  # each step's own weights
    assert summary["last_loss"] < summary["first_loss"] / 3
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < rows[0]["loss"]
    first, last = evals[0]["eval_accuracy"], evals[-1]["eval_accuracy"]
    assert first <= 0.1 and last >= first + 0.3
    assert all(r["truncated"] == 0 for r in rows)
    assert len(json.loads((tmp_path / "placement.json").read_text())["rollout"]) == 1
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_dpo_demo_learns_and_the_reference_is_computed_once_per_pair(tmp_path):
    overrides = [*QUICK, f"run.output_dir={tmp_path}", "data.eval_rows=32", "data.demo_size=96"]
    first = load_config(
        ROOT / "configs" / "dpo_demo.yaml",
        [*overrides, "run.steps=24", "run.checkpoint_every=12"],
    )
    summary = train_offline(first)
    assert summary["reference_forwards"] == 96  # every pair, train and held out, once
    rows = metrics(tmp_path)
    first5 = sum(r["accuracy"] for r in rows[:5]) / 5
    last5 = sum(r["accuracy"] for r in rows[-5:]) / 5
    assert last5 >= first5 + 0.3 and last5 >= 0.8
    assert rows[-1]["eval_accuracy"] >= 0.7
    ref_bytes = (tmp_path / REFERENCE_FILE).read_bytes()

    # Resumed (with trained weights), the run reads the reference; it never recomputes it.
    resumed = load_config(
        ROOT / "configs" / "dpo_demo.yaml",
        [*overrides, "run.steps=28", "run.resume=auto", "run.overwrite=false"],
    )
    summary = train_offline(resumed)
    assert summary["reference_forwards"] == 0
    assert (tmp_path / REFERENCE_FILE).read_bytes() == ref_bytes
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 29))


@pytest.mark.parametrize("method", ["none", "lora"])
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_dpo_trains_full_and_lora_on_zero_0_and_3(tmp_path, tiny_path, method, zero_stage):
    """Step 1's policy is the reference (the pass before it read the untrained weights, also
    with no adapter to switch off), so its loss is log 2 and no pair is ranked; then the loss
    and accuracy on the 16 training pairs (8 a step, 6 epochs) improve. Seeds 0-2 measured,
    first 4 steps -> last 4: accuracy 0.38-0.63 -> 0.94-1.0, loss 0.50-0.72 -> 0.06-0.21."""
    cfg = load_config(
        ROOT / "configs" / "dpo_demo.yaml",
        [
            *QUICK,
            f"run.output_dir={tmp_path}",
            f"peft.method={method}",
            f"learner.zero_stage={zero_stage}",
            "run.steps=12",
            "run.checkpoint_every=12",
            "data.demo_size=16",
            "data.eval_rows=0",
        ],
    )
    summary = train_offline(cfg)
    assert summary["reference_forwards"] == 16
    rows = metrics(tmp_path)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[0]["accuracy"] == 0

    def mean(key: str, part: list[dict]) -> float:
        return sum(r[key] for r in part) / len(part)

    first, last = rows[:4], rows[-4:]
    assert mean("accuracy", last) >= max(0.85, mean("accuracy", first) + 0.2)
    assert mean("loss", last) <= mean("loss", first) / 2
    assert (tmp_path / "checkpoints" / "step-00000012" / "COMMIT").exists()
    if method == "lora":
        adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        lora_b = [t for k, t in adapter.items() if "lora_B" in k]
        assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # B starts at zero
    else:
        # every weight, whole (ZeRO-3 partitions gathered) and trained
        base = load_file(str(Path(tiny_path) / "model.safetensors"))
        model = load_file(str(tmp_path / "model" / "model.safetensors"))
        assert model.keys() == base.keys()
        for name, t in base.items():
            assert model[name].shape == t.shape and not torch.equal(model[name], t), name


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_the_commands_run_the_shipped_recipes(tmp_path, command):
    out = tmp_path / command
    r = subprocess.run(
        [
            DIST_FT,
            command,
            str(ROOT / "configs" / f"{command}_demo.yaml"),
            "run.steps=3",
            "run.eval_every=3",
            "data.eval_rows=8",
            f"run.output_dir={out}",
            *QUICK,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{command} loss: first 5 steps" in r.stdout
    rows = metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3] and "eval_loss" in rows[-1]
    assert "eval_accuracy" in rows[-1]
    # SFT's held-out answers are generated on a rollout worker; DPO runs learners only
    workers = json.loads((out / "placement.json").read_text())["rollout"]
    assert len(workers) == (1 if command == "sft" else 0)
