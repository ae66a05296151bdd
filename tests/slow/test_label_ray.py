"""`dist-ft label` on a local Ray: two rollout workers and the judge as actors of their own."""

import json
from pathlib import Path

from dist_ft.data import load_rows, prepare_preferences
from dist_ft.model.loading import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_label_on_ray_with_two_workers_and_the_judge_as_its_own_actor(
    tmp_path, monkeypatch, tiny_path
):
    monkeypatch.chdir(ROOT)  # the recipe names its constitution relative to the repo
    out = tmp_path / "pairs.jsonl"
    from dist_ft.cli import main

    rc = main(
        [
            "label",
            str(ROOT / "configs" / "rlaif_dpo_demo.yaml"),
            "resources.mode=ray",
            "resources.ray_address=local",
            "resources.rollout_workers=2",
            "label.prompts=16",
            "rollout.group_size=4",
            f"label.output={out}",
            "run.wandb=disabled",
        ]
    )
    assert rc == 0
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    placement = meta["placement"]
    workers = {a["pid"] for a in placement["rollout"]}
    assert len(workers) == 2 and len(placement["judge"]) == 1
    assert placement["judge"][0]["pid"] not in workers | {placement["learner"][0]["pid"]}
    assert meta["samples"] == 16 * 4 and meta["reward_errors"] == 0
    assert meta["pairs"] + meta["dropped_below_margin"] + meta["dropped_no_pair"] == 16
    rows = load_rows(str(out))
    prepared = prepare_preferences(
        rows,
        load_tokenizer(tiny_path),
        source=str(out),
        template="plain",
        plain_template="{prompt}",
        on_bad_row="error",
    )
    assert len(prepared.pairs) == meta["pairs"] > 0
