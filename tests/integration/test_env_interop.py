"""Other libraries' environments, unchanged, through dist_ft (offline): reasoning-gym's task
generators and verifiers, and skyrl-gym's text environments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from generators import Scripted
from support import build

from dist_ft.data import DatasetError, load_rows
from dist_ft.rollout import RolloutWorker
from dist_ft.wire.prompt import Prompt

DIST_FT = Path(sys.executable).with_name("dist-ft")
SCRIPTED = ("reward.functions=[]", "rollout.group_size=2", "rollout.generator=generators:Scripted",
            "rollout.max_new_tokens=40")  # fmt: skip


def prompt_of(row: dict) -> Prompt:
    return Prompt(0, str(row["prompt"]), row.get("answer"), row=row)


@pytest.mark.parametrize(("reply", "reward"), [("<answer>{}</answer>", 1.0), ("7", 0.0)])
def test_reasoning_gym_verifier_scores_the_reply(tiny_path, monkeypatch, reply, reward):
    (row,) = load_rows("reasoning_gym/leg_counting", 1, seed=3)
    monkeypatch.setattr(Scripted, "turns", [reply.format(row["answer"])])
    _, wk, _ = build(tiny_path, "env.name=reasoning_gym", *SCRIPTED)
    batch = RolloutWorker(wk).rollout(1, [prompt_of(row)], seed=0)
    assert batch.rewards[:, 0].tolist() == [reward, reward]
    assert batch.counters["env/solved"] == 2 * reward


def test_reasoning_gym_retries_after_a_wrong_answer(tiny_path, monkeypatch):
    (row,) = load_rows("reasoning_gym/leg_counting", 1, seed=3)
    monkeypatch.setattr(Scripted, "turns", ["7", f"<answer>{row['answer']}</answer>"])
    _, wk, _ = build(tiny_path, "env.name=reasoning_gym", "env.kwargs={retries: 2}", *SCRIPTED)
    worker = RolloutWorker(wk)
    batch = worker.rollout(1, [prompt_of(row)], seed=0)
    assert batch.counters["env/turns"] == 4 and batch.counters["env/solved"] == 2
    text = worker.generator.tokenizer.decode(batch.episode_ids[0], skip_special_tokens=True)
    assert "That is not right. Try again." in text


def test_an_unknown_reasoning_gym_task_names_itself():
    with pytest.raises(DatasetError, match="reasoning_gym/no_such_task: Dataset 'no_such_task'"):
        load_rows("reasoning_gym/no_such_task", 1)


GSM8K = {
    "prompt": [{"role": "user", "content": "What is 3 + 4? End with '#### N'."}],
    "env_class": "gsm8k_multi_turn",
    "reward_spec": {"method": "rule", "ground_truth": "7"},
    "extra_info": {"max_turns": 2},
}


@pytest.mark.parametrize(
    ("turns", "reward", "n_turns"), [(["#### 7"], 1.0, 1), (["#### 5", "#### 7"], 1.1, 2)]
)
def test_skyrl_gym_multi_turn_gsm8k_runs_unchanged(tiny_path, monkeypatch, turns, reward, n_turns):
    monkeypatch.setattr(Scripted, "turns", turns)
    _, wk, _ = build(tiny_path, "env.name=skyrl_gym", *SCRIPTED)
    batch = RolloutWorker(wk).rollout(1, [prompt_of(GSM8K)], seed=0)
    # its own rewards: 1 when right, 0.2 / max_turns for the right format but a wrong number
    assert batch.rewards[:, 0].tolist() == pytest.approx([reward, reward])
    assert batch.counters["env/turns"] == 2 * n_turns and batch.counters["env/steps"] == 2 * n_turns


def test_a_skyrl_dataset_file_trains_through_dist_ft(tmp_path):
    """SkyRL's dataset layout (chat-message prompts, env_class, reward_spec) read as it is, the
    tiny model trained for 2 steps on skyrl-gym's gsm8k environment; a length reward beside the
    environment's gives the random model's samples different returns, so the weights move."""
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("\n".join(json.dumps(GSM8K) for _ in range(4)) + "\n")
    out = tmp_path / "run"
    config = {
        "data": {"source": str(data), "template": "chat"},
        "env": {"name": "skyrl_gym"},
        "rollout": {"group_size": 2, "max_new_tokens": 8},
        "reward": {"functions": [{"name": "length_penalty", "kwargs": {"max_chars": 4}}]},
        "algo": {"prompts_per_step": 2},
        "grpo": {"sft_warmup_steps": 0},
        "run": {"steps": 2, "output_dir": str(out), "wandb": "disabled"},
    }
    (tmp_path / "skyrl.yaml").write_text(json.dumps(config))  # JSON is YAML
    cmd = [str(DIST_FT), "train", str(tmp_path / "skyrl.yaml")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["env/episodes"] for m in rows] == [4.0, 4.0]
    assert all("reward/env" in m and m["env/errors"] == 0 for m in rows)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
