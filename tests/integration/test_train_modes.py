"""Whole runs of `train()` in debug mode: staleness bounds, bad-row handling, RLAIF."""

import json
from pathlib import Path

import pytest
from bad_rows import write_bad_dataset, write_clean_dataset

from dist_ft.algos.grpo import MismatchError
from dist_ft.config import load_config
from dist_ft.data import DatasetError
from dist_ft.recipes.grpo import train

ROOT = Path(__file__).resolve().parents[2]
FAST = ["run.wandb=disabled", "run.plot=false", "run.deterministic=true"]


def run(out: Path, *overrides: str, config: Path | None = None) -> dict:
    return train(load_config(config, [*FAST, f"run.output_dir={out}", *overrides]))


def ledger(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_no_sample_older_than_max_staleness(tmp_path, max_staleness):
    out = tmp_path / "run"
    run(out, "run.steps=6", "grpo.sft_warmup_steps=1", f"grpo.max_staleness={max_staleness}")
    rows = ledger(out)
    ages = [row["learner_version"] - s[3] for row in rows for s in row["samples"]]
    assert len(ages) == 6 * 64
    assert max(ages) <= max_staleness and min(ages) >= 0
    if max_staleness == 0:  # exactly on-policy: every sample from the version being trained
        assert set(ages) == {0}
    else:  # the pipeline really ran ahead: after the first steps, samples are that stale
        assert ages[-1] == max_staleness
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["staleness/max"] <= max_staleness for m in metrics)
    if max_staleness == 0:  # the HF engine in fp32 samples exactly what the learner recomputes
        assert max(m["mismatch/mean_abs_log_ratio"] for m in metrics) <= 1e-5
    # Debug mode generates when a rollout is issued, not when it is collected: the step's
    # rollout time includes it (at least the worker's own generate-and-score time).
    for m in metrics:
        assert m["rollout_seconds"] >= 64 / m["rollout/worker0_samples_per_s"], m


def test_bad_rows_skip_trains_like_the_clean_dataset_and_error_fails_before_step_1(tmp_path):
    dirty, clean = tmp_path / "dirty.jsonl", tmp_path / "clean.jsonl"
    first_row, first_field = write_bad_dataset(dirty, n_good=150, n_bad=100, seed=9)
    write_clean_dataset(clean, n_good=150, seed=9)
    common = ["run.steps=3", "grpo.sft_warmup_steps=0", "data.max_prompt_tokens=64"]

    with pytest.raises(DatasetError, match=rf"{dirty}: row {first_row}: field '{first_field}'"):
        run(tmp_path / "error", *common, f"data.source={dirty}")
    assert not (tmp_path / "error" / "metrics.jsonl").exists()  # no step ran

    run(tmp_path / "skip", *common, f"data.source={dirty}", "data.on_bad_row=skip")
    run(tmp_path / "clean", *common, f"data.source={clean}")
    rejects = (tmp_path / "skip" / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 100 and all(json.loads(r)["source"] == str(dirty) for r in rejects)
    assert losses(tmp_path / "skip") == losses(tmp_path / "clean")


def test_rlaif_demo_raises_the_judge_score(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the constitution path in the recipe is relative to the repo
    summary = run(tmp_path / "rlaif", config=ROOT / "configs" / "rlaif_demo.yaml")
    print(f"RLAIF judge score: {summary['first_reward']:.3f} -> {summary['last_reward']:.3f}")
    assert summary["last_reward"] > summary["first_reward"] + 0.2
    last = json.loads((tmp_path / "rlaif" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["judge/requests"] == 64 and last["judge/cache_hits"] >= 0
    assert last["reward/errors/judge"] == 0


def test_max_mismatch_stops_a_run_whose_engine_samples_another_policy(tmp_path):
    # bf16 rollouts of an fp32 learner: the engine's logprobs are off by ~1e-2, over the limit
    with pytest.raises(MismatchError, match=r"step 1: .*algo\.max_mismatch=0\.001") as e:
        run(tmp_path, "run.steps=3", "grpo.sft_warmup_steps=0", "rollout.dtype=bfloat16",
            "algo.max_mismatch=1e-3")  # fmt: skip
    print(e.value)
    assert len(losses(tmp_path)) == 1  # step 1 was logged, with the mismatch that stopped it
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and "MismatchError" in status["reason"]
