import sys

import pytest
import torch

from dist_ft.rewards import RewardError, RewardSet, resolve
from dist_ft.rewards.rules import char_match, exact_match, format_regex, length_penalty


def test_exact_match_normalises_case_space_and_full_stop():
    out = exact_match(["q"] * 4, ["  Paris. ", "paris", "Lyon", "PARIS  "], ["paris"] * 3 + [None])
    assert out == [1.0, 1.0, 0.0, 0.0]


def test_char_match_gives_positional_partial_credit():
    assert char_match(["q"] * 3, ["cccc", "ccxx", "xcxx"], ["cccc"] * 3) == [1.0, 0.5, 0.25]


def test_format_regex_and_length_penalty():
    assert format_regex(["q"] * 2, ["<a>1</a>", "1"], [None] * 2, pattern=r"<a>\d+</a>") == [
        1.0,
        0.0,
    ]
    assert length_penalty(["q"] * 3, ["abcd", "abcdef", "a" * 20], [None] * 3, max_chars=4) == [
        0.0,
        -0.5,
        -1.0,
    ]


def test_weighted_sum_keeps_each_component(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shout(prompts, completions, answers, bonus=0.0):\n"
        "    return [float(c.isupper()) + bonus for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rs = RewardSet([("exact_match", 2.0, {}), ("my_rewards:shout", 0.5, {"bonus": 0.1})])
    per_fn, total = rs.score(["p", "p"], ["ABC", "abc"], ["abc", "abc"])
    torch.testing.assert_close(per_fn, torch.tensor([[1.0, 1.1], [1.0, 0.1]]))
    torch.testing.assert_close(total, torch.tensor([2.0 + 0.55, 2.0 + 0.05]))
    assert rs.names == ["exact_match", "my_rewards:shout"]
    sys.modules.pop("my_rewards", None)


def test_bad_reward_names_and_outputs_are_errors(tmp_path, monkeypatch):
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        resolve("nope")
    with pytest.raises(RewardError, match="cannot load reward 'no_such_mod:f'"):
        resolve("no_such_mod:f")
    (tmp_path / "bad_rewards.py").write_text(
        "def boom(p, c, a):\n    raise ValueError('kaput')\n"
        "def nan(p, c, a):\n    return [float('nan')] * len(c)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="reward 'bad_rewards:boom' raised ValueError: kaput"):
        RewardSet([("bad_rewards:boom", 1.0, {})]).score(["p"], ["c"], [None])
    with pytest.raises(RewardError, match=r"bad_rewards:nan.*non-finite"):
        RewardSet([("bad_rewards:nan", 1.0, {})]).score(["p"], ["c"], [None])
    sys.modules.pop("bad_rewards", None)
