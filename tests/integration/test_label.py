"""`dist-ft label` in debug mode: the tiny policy's samples judged by the tiny judge into
preference pairs that `dist-ft dpo` validates and trains on, each with its judge and
constitution recorded, and the pairs below the margin dropped and counted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_ft.config import TinyModelConfig
from dist_ft.data import load_rows, prepare_preferences
from dist_ft.model.loading import load_tokenizer, resolve_model_path
from dist_ft.recipes.label import candidates, write_pairs
from dist_ft.rewards.judge import load_constitution

ROOT = Path(__file__).resolve().parents[2]
DIST_FT = str(Path(sys.executable).with_name("dist-ft"))
CONFIG = str(ROOT / "configs" / "rlaif_dpo_demo.yaml")
CONSTITUTION = ROOT / "configs" / "constitutions" / "default.yaml"
MIN_MARGIN = 0.005
PROMPTS = 16


def dist_ft(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([DIST_FT, *argv], cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """One label run of the demo recipe, smaller (16 prompts x 4 samples): output, stdout."""
    out = tmp_path_factory.mktemp("label") / "pairs.jsonl"
    r = dist_ft(
        "label",
        CONFIG,
        f"label.output={out}",
        f"label.prompts={PROMPTS}",
        f"label.min_margin={MIN_MARGIN}",
        "rollout.group_size=4",
        "run.wandb=disabled",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def validate(path: Path, tiny_path: str):
    tok = load_tokenizer(tiny_path)
    return prepare_preferences(
        load_rows(str(path)),
        tok,
        source=str(path),
        template="plain",
        plain_template="{prompt}",
        max_length=256,
        on_bad_row="error",  # any bad row raises
    )


def test_label_writes_pairs_that_dpo_validation_accepts(labelled, tiny_path):
    out, _ = labelled
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    prepared = validate(out, tiny_path)
    assert len(prepared.pairs) == len(rows) > 0 and prepared.rejects == []


def test_every_pair_clears_the_margin_and_names_its_judge_and_constitution(labelled):
    out, stdout = labelled
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    constitution = load_constitution(CONSTITUTION)
    judge = resolve_model_path("tiny", TinyModelConfig(seed=1))
    for row in rows:
        assert row["constitution_sha256"] == constitution.sha256()
        assert row["judge_model"] == judge
        assert MIN_MARGIN <= row["margin"] <= 1
        assert row["chosen"] != row["rejected"] and row["chosen_score"] >= row["rejected_score"]
        assert list(row["principle_scores"]) == constitution.principles
        assert row["prompt"].startswith("Repeat ")  # the row's own text, for DPO to render
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["prompts"] == PROMPTS and meta["samples"] == PROMPTS * 4
    assert meta["pairs"] == len(rows)
    # Every prompt is a pair, a pair dropped below the margin, or one without two completions.
    assert meta["pairs"] + meta["dropped_below_margin"] + meta["dropped_no_pair"] == PROMPTS
    assert meta["dropped_below_margin"] > 0  # the tiny judge is unsure of some: they are counted
    assert meta["constitution_sha256"] == constitution.sha256() and meta["judge_model"] == judge
    assert meta["placement"]["rollout"][0]["node_id"] == "local"
    assert (
        f"label: {len(rows)} pairs from {PROMPTS} prompts -> {out} (dropped: "
        f"{meta['dropped_below_margin']} below label.min_margin={MIN_MARGIN}, "
        f"{meta['dropped_disagreed']} of them disagreeing;" in stdout
    )


def test_dpo_trains_on_the_labels(labelled, tmp_path):
    out, _ = labelled
    r = dist_ft(
        "dpo",
        CONFIG,
        f"data.source={out}",
        "algo.prompts_per_step=2",
        "run.steps=2",
        f"run.output_dir={tmp_path / 'dpo'}",
        "run.wandb=disabled",
        "run.plot=false",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dpo loss: first 5 steps" in r.stdout


def test_parquet_output_reads_back_the_same(labelled, tmp_path, tiny_path):
    out, _ = labelled
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    parquet = tmp_path / "pairs.parquet"
    write_pairs(parquet, rows)
    assert [dict(r) for r in load_rows(str(parquet))] == rows
    assert len(validate(parquet, tiny_path).pairs) == len(rows)


def test_an_existing_output_is_kept_unless_overwrite(labelled):
    out, _ = labelled
    before = out.read_bytes()
    r = dist_ft("label", CONFIG, f"label.output={out}", "run.wandb=disabled")
    assert r.returncode == 2 and "already exists" in r.stderr and "run.overwrite=true" in r.stderr
    assert out.read_bytes() == before


def test_label_refuses_a_recipe_without_the_judge(tmp_path):
    r = dist_ft(
        "label",
        CONFIG,
        "reward.functions=[{name: char_match}]",
        f"label.output={tmp_path / 'x.jsonl'}",
    )
    assert r.returncode == 2 and "add {name: judge} to reward.functions" in r.stderr


def test_candidates_are_the_best_and_worst_distinct_completions():
    # best "b" (3); worst of the texts unlike it: "a" at 0; the blank one never counts
    assert candidates(["a", "b", "a", " "], [1.0, 3.0, 0.0, 9.0]) == (1, 2)
    assert candidates(["a", "a", "a"], [1.0, 2.0, 3.0]) is None  # nothing to prefer
    assert candidates(["a", ""], [1.0, 2.0]) is None
    assert candidates(["x", "y", "z"], [1.0, 1.0, 1.0]) == (0, 1)  # ties: the earlier
