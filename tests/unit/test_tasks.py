"""Multi-task: the built-in tasks, the task column, reward functions routed per task, the checks
that tie the data's tasks to the reward functions, and the per-task metrics."""

import json

import pytest
import torch

from dist_ft.cluster import SyncStats
from dist_ft.config import ConfigError, load_config
from dist_ft.data import DatasetError, load_rows, prepare_prompts
from dist_ft.model.loading import load_tokenizer
from dist_ft.recipes.grpo import step_metrics
from dist_ft.rewards import RewardSet, applies, task_mismatch
from dist_ft.tasks import DEMO_LETTERS, TASKS, demo_format_rows, demo_rows
from dist_ft.wire.batch import ScoredBatch

HERE = __name__
CALLS: list[list[str]] = []  # completions each call of `recorded` saw


def recorded(prompts, completions, answers):
    CALLS.append(list(completions))
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def tok(tiny_path):
    return load_tokenizer(tiny_path)


def prepare(rows, tok, source="test.jsonl"):
    return prepare_prompts(
        rows,
        tok,
        source=source,
        prompt_field="prompt",
        answer_field="answer",
        template="plain",
        plain_template="{prompt}",
        max_prompt_tokens=32,
    )


def test_builtin_tasks_are_verifiable_and_the_mix_deals_them_in_turn():
    for c, answer in zip(DEMO_LETTERS, "cdfghjkb"):
        assert TASKS["next"][1](c) == answer
    mix = demo_rows(40, seed=3, source="demo_mix")
    assert mix == demo_rows(40, seed=3, source="demo_mix")
    assert [r["task"] for r in mix[:4]] == ["repeat", "next", "repeat", "next"]
    for r in mix:
        instruction, letter = TASKS[r["task"]]
        word, c = r["prompt"].rstrip(":").split(" ")
        assert word == instruction and r["answer"] == letter(c) * 4
        # no answer letter sits in the instruction, where a fixed-position copy would pay
        assert not set(r["answer"]) & set(instruction)
    # single-task sources have no task column; "demo" is the letter-repeat demo, as before
    assert all("task" not in r for r in demo_rows(8) + demo_rows(8, source="demo_next"))
    assert [r["answer"] for r in demo_rows(8)] == [r["prompt"][-2] * 4 for r in demo_rows(8)]
    # the warm-up sees the mix's prompts, but not its answers
    warm = demo_format_rows(40, seed=3, source="demo_mix")
    assert [w["prompt"] for w in warm] == [r["prompt"] for r in mix]
    assert all(len(set(w["completion"])) == 1 for w in warm)


def test_task_column_sets_each_prompts_task(tok, tmp_path):
    prompts = prepare(load_rows("demo_mix", 6), tok, source="demo_mix").prompts
    assert [p.task for p in prompts] == ["repeat", "next"] * 3
    rows = [{"prompt": "a", "answer": "b"}, {"prompt": "a", "answer": "b", "task": "qa"}]
    assert [p.task for p in prepare(rows, tok).prompts] == ["default", "qa"]
    with pytest.raises(DatasetError, match=r"test.jsonl: row 1: field 'task': expected a string"):
        prepare([rows[0], {**rows[1], "task": 3}], tok)
    with pytest.raises(DatasetError, match=r"row 1: field 'task': empty task"):
        prepare([rows[0], {**rows[1], "task": " "}], tok)


def test_each_function_scores_only_the_samples_of_its_tasks():
    CALLS.clear()
    rs = RewardSet(
        [("exact_match", 1.0, {}), (f"{HERE}:recorded", 0.5, {}), ("char_match", 2.0, {})],
        tasks=[["a"], ["b"], []],
    )
    tasks = ["a", "b", "a", "b"]
    completions = ["x", "yy", "zzz", "x"]
    scores = rs.score(["p"] * 4, completions, ["x", "x", "x", "x"], tasks)
    assert CALLS == [["yy", "x"]]  # called once, with task b's samples only, in order
    expected = [[1.0, 0.0, 1.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    torch.testing.assert_close(scores.rewards_NK, torch.tensor(expected))
    assert not scores.errors_NK.any()  # a function cannot fail on a task it does not score
    torch.testing.assert_close(scores.total(rs.weights), torch.tensor([3.0, 1.0, 0.0, 2.5]))
    # a batch without a function's task does not call it at all
    CALLS.clear()
    rs.score(["p"], ["x"], ["x"], ["a"])
    assert CALLS == []
    # no tasks given: every function scores every sample, as before multi-task
    assert rs.score(["p"], ["x"], ["x"]).rewards_NK.tolist() == [[1.0, 1.0, 1.0]]


def test_a_failure_fails_only_the_samples_of_its_tasks():
    rs = RewardSet(
        [("reward_fns:raises", 1.0, {}), ("exact_match", 1.0, {})],
        tasks=[["a"], []],
    )
    scores = rs.score(["p"] * 3, ["x"] * 3, ["x"] * 3, ["a", "b", "a"])
    assert scores.errors_NK.tolist() == [[True, False], [False, False], [True, False]]
    assert scores.total(rs.weights, fill=0.0).tolist() == [1.0, 1.0, 1.0]


def test_reward_tasks_must_match_the_functions():
    with pytest.raises(ValueError, match="1 task lists for 2 reward functions"):
        RewardSet([("exact_match", 1.0, {}), ("char_match", 1.0, {})], tasks=[[]])
    assert applies([["a"], [], ["b", "c"]], ["c", "a"]).tolist() == [
        [False, True, True],
        [True, True, False],
    ]


def test_a_task_without_a_reward_function_is_named_with_the_file():
    mismatch = task_mismatch(["char_match"], [["repeat"]], {"repeat", "next"}, "mix.jsonl")
    assert mismatch.startswith("mix.jsonl: task 'next' has no reward function")
    mismatch = task_mismatch(["char_match"], [["repeat"]], {"repeat", "default"}, "mix.jsonl")
    assert "task 'default' has no reward function (its rows have no task column" in mismatch
    assert task_mismatch(["a", "b"], [[], ["next"]], {"repeat", "next"}, "mix.jsonl") is None


def test_a_function_naming_a_task_absent_from_the_data_is_named():
    mismatch = task_mismatch(["char_match", "exact_match"], [[], ["nxet"]], {"next"}, "d.jsonl")
    assert mismatch == "reward 'exact_match' names tasks ['nxet'] that d.jsonl does not have " + (
        "(its tasks: ['next'])"
    )


def test_config_takes_reward_tasks_and_the_mix_warm_up(tmp_path):
    cfg = load_config(None, ["data.source=demo_mix", "reward.functions=[{name: x, tasks: [a]}]"])
    assert cfg.reward.functions[0].tasks == ["a"] and cfg.grpo.sft_warmup_steps > 0
    with pytest.raises(ConfigError, match=r"reward.functions\[0\].tasks: expected a list"):
        load_config(None, ["reward.functions=[{name: x, tasks: a}]"])
    with pytest.raises(ConfigError, match="sft_warmup_steps"):
        load_config(None, [f"data.source={tmp_path / 'd.jsonl'}"])


def test_step_metrics_report_each_task_and_each_function_over_its_tasks():
    # 4 samples: rows 0 and 1 are task a, row 2 task b; function 0 scores a, function 1 all
    n = 4
    batch = ScoredBatch(
        prompt_ids=torch.zeros(3, 2, dtype=torch.int32),
        prompt_mask=torch.ones(3, 2, dtype=torch.bool),
        group_ids=torch.tensor([0, 1, 2, 2], dtype=torch.int32),
        episode_ids=torch.zeros(n, 2, dtype=torch.int32),
        episode_mask=torch.full((n, 2), 2, dtype=torch.int8),
        logprobs=torch.zeros(n, 2),
        rewards=torch.tensor([[1.0, 0.5], [0.0, 0.5], [0.0, 1.0], [0.0, 0.0]]),
        reward_total=torch.tensor([1.5, 0.5, 1.0, 0.0]),
        advantages=torch.zeros(n),
        sample_ids=torch.tensor([[1, 0, 0], [1, 1, 0], [1, 2, 0], [1, 2, 1]], dtype=torch.int32),
        versions=torch.zeros(n, dtype=torch.int32),
        reward_names=["exact_match", "char_match"],
    )
    sync = SyncStats(version=1, nbytes=0, seconds=1.0)
    learner = {"tokens": 8.0}
    task_of = {0: "a", 1: "a", 2: "b"}
    m = step_metrics(learner, batch, {}, sync, 1.0, 1.0, task_of, [["a"], []])
    assert m["reward/task/a"] == 1.0 and m["reward/task/b"] == 0.5
    assert m["reward/exact_match"] == 0.5  # over task a's samples, not diluted by task b's
    assert m["reward/char_match"] == 0.5 and m["reward/mean"] == 0.75
    assert m["reward/errors/exact_match"] == 0.0
    # one task in the data: reward/mean says it all
    m = step_metrics(learner, batch, {}, sync, 1.0, 1.0, dict.fromkeys(range(3), "a"), [[], []])
    assert not [k for k in m if k.startswith("reward/task/")]
    assert json.dumps(m)  # plain floats only
