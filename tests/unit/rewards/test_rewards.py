import asyncio
import math
import sys
import threading
import time

import pytest
import torch

from dist_ft.rewards import RewardError, RewardSet, resolve
from dist_ft.rewards.rules import (
    char_match,
    exact_match,
    extract_answer,
    format_regex,
    length_penalty,
    math_answer,
)

# User rewards below are loaded the way a config names them: "<this module>:<function>".
HERE = __name__
RELEASE = threading.Event()  # lets the abandoned hung threads finish once a test is done
CANCELLED = threading.Event()


def boom(prompts, completions, answers):
    raise ZeroDivisionError("kaput")


def hang(prompts, completions, answers):
    RELEASE.wait(60)
    return [1.0] * len(completions)


async def hang_async(prompts, completions, answers):
    try:
        await asyncio.sleep(60)
    finally:
        CANCELLED.set()
    return [1.0] * len(completions)


async def length_async(prompts, completions, answers, scale=1.0):
    await asyncio.sleep(0.01)
    return [scale * len(c) for c in completions]


async def own_timeout(prompts, completions, answers):
    raise TimeoutError("upstream judge timed out")


def nan_at_1(prompts, completions, answers):
    return [0.5, float("nan"), 0.25, math.inf, None, "1.0"][: len(completions)]


def one_short(prompts, completions, answers):
    return [1.0] * (len(completions) - 1)


def not_a_list(prompts, completions, answers):
    return 1.0


@pytest.fixture(autouse=True)
def _release_hung_threads():
    RELEASE.clear()
    CANCELLED.clear()
    yield
    RELEASE.set()


def test_exact_match_normalises_case_space_and_full_stop():
    out = exact_match(["q"] * 4, ["  Paris. ", "paris", "Lyon", "PARIS  "], ["paris"] * 3 + [None])
    assert out == [1.0, 1.0, 0.0, 0.0]


def test_char_match_gives_positional_partial_credit():
    assert char_match(["q"] * 3, ["cccc", "ccxx", "xcxx"], ["cccc"] * 3) == [1.0, 0.5, 0.25]


def test_char_match_charges_extra_characters_like_missing_ones():
    # 4 right of 8 written, 2 right of 4 wanted, 3 right of 5 written; whitespace around is free
    completions = ["gggggggg", "gg", "ggggx", " gggg\n", "xgggg", ""]
    assert char_match(["q"] * 6, completions, ["gggg"] * 6) == [0.5, 0.5, 0.8, 1.0, 0.6, 0.0]
    assert char_match(["q"] * 2, ["gggg", "gggg"], [None, "  "]) == [0.0, 0.0]


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


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        (r"so $\boxed{\frac{1}{2}}$.", "0.5"),
        (r"\boxed{\dfrac12}", "1/2"),
        (r"\boxed{-\frac{3}{4}}", "-0.75"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3,\frac{\pi}{2})"),  # nested braces
        (r"\boxed{\{1, 2\}}", r"\{1,2\}"),  # escaped braces don't close the box
        (r"\boxed{1,000}", "1000"),
        (r"\boxed{1{,}000{,}000}", "1000000"),
        (r"\boxed{1\,000\,000}", "1,000,000"),
        (r"\boxed{10\text{ cm}^2}", "10"),
        (r"\boxed{\text{Paris}}", "paris"),
        (r"\boxed{x = 3}", "3"),
        (r"\boxed{+90^\circ}", "90"),
        (r"\boxed{50\%}", "50"),
        (r"$\boxed 5$.", "5"),
        (r"\fbox{7}", "7"),
        (r"first \boxed{1}, no: \boxed{2}", "2"),  # last box wins
        (r"\boxed{1} then \boxed{2", "1"),  # a box cut off by the length limit is skipped
        ("The answer is $-3$. Check: 1 + 2", "-3"),
        ("Answer: 42", "42"),
        ("#### 72", "72"),
        ("so 1,234 apples in total", "1234"),
        ("7", r"\boxed{7}"),  # a boxed reference is unboxed
    ],
)
def test_math_answer_accepts_equal_answers(completion, answer):
    assert math_answer(["q"], [completion], [answer]) == [1.0]


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("no number here", "0"),
        (r"\boxed{}", "0"),
        (r"\boxed{0.3333}", "1/3"),
        (r"\boxed{2} and later 3", "3"),  # a box beats a later number
        (r"\boxed{12}", None),
        (r"\boxed{1,2}", "12"),  # a pair, not a thousands separator
    ],
)
def test_math_answer_rejects_others(completion, answer):
    assert math_answer(["q"], [completion], [answer]) == [0.0]


def test_extract_answer_rules():
    assert extract_answer(r"\boxed{\frac{a}{b}}") == r"\frac{a}{b}"
    assert extract_answer("The answer is 3. Then 4") == "3"
    assert extract_answer("3 then 4.5") == "4.5"
    assert extract_answer("nothing") is None


def test_weighted_sum_keeps_each_component(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shout(prompts, completions, answers, bonus=0.0):\n"
        "    return [float(c.isupper()) + bonus for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rs = RewardSet([("exact_match", 2.0, {}), ("my_rewards:shout", 0.5, {"bonus": 0.1})])
    scores = rs.score(["p", "p"], ["ABC", "abc"], ["abc", "abc"])
    torch.testing.assert_close(scores.rewards_NK, torch.tensor([[1.0, 1.1], [1.0, 0.1]]))
    assert not scores.errors_NK.any() and scores.messages == {}
    torch.testing.assert_close(scores.total(rs.weights), torch.tensor([2.0 + 0.55, 2.0 + 0.05]))
    assert rs.names == ["exact_match", "my_rewards:shout"]
    sys.modules.pop("my_rewards", None)


def test_bad_reward_names_are_errors():
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        resolve("nope")
    with pytest.raises(RewardError, match="cannot load reward 'no_such_mod:f'"):
        resolve("no_such_mod:f")
    with pytest.raises(RewardError, match="cannot load reward"):
        RewardSet([(f"{HERE}:no_such_fn", 1.0, {})])
    with pytest.raises(RewardError, match="empty"):
        RewardSet([])


def test_raising_reward_fails_its_column_only():
    rs = RewardSet([("exact_match", 1.0, {}), (f"{HERE}:boom", 1.0, {})])
    scores = rs.score(["p"] * 3, ["a", "b", "c"], ["a", "x", "c"])
    assert scores.errors_NK.tolist() == [[False, True]] * 3
    assert scores.rewards_NK[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert scores.rewards_NK[:, 1].isnan().all()
    assert scores.messages == {
        f"{HERE}:boom": f"reward '{HERE}:boom' raised ZeroDivisionError: kaput"
    }
    assert scores.total(rs.weights).isnan().all()
    assert scores.total(rs.weights, fill=0.0).tolist() == [1.0, 0.0, 1.0]


def test_hung_reward_times_out_and_does_not_block_the_next_call():
    rs = RewardSet([(f"{HERE}:hang", 1.0, {}), ("exact_match", 1.0, {})], timeout_s=0.5)
    for _ in range(2):  # the second call is not queued behind the first, still hung, thread
        start = time.monotonic()
        scores = rs.score(["p"] * 2, ["a", "b"], ["a", "a"])
        assert time.monotonic() - start < 2.0
        assert scores.errors_NK[:, 0].all() and not scores.errors_NK[:, 1].any()
        assert scores.rewards_NK[:, 1].tolist() == [1.0, 0.0]
        assert scores.messages == {f"{HERE}:hang": f"reward '{HERE}:hang' timed out after 0.5 s"}


def test_hung_async_reward_is_cancelled():
    rs = RewardSet([(f"{HERE}:hang_async", 1.0, {})], timeout_s=0.3)
    start = time.monotonic()
    scores = rs.score(["p"], ["a"], [None])
    assert time.monotonic() - start < 2.0
    assert CANCELLED.is_set()
    assert (
        scores.errors_NK.all() and "timed out after 0.3 s" in scores.messages[f"{HERE}:hang_async"]
    )


def test_async_rewards_are_awaited():
    rs = RewardSet(
        [(f"{HERE}:length_async", 1.0, {"scale": 2.0}), (f"{HERE}:own_timeout", 1.0, {})],
        extra={"judge": length_async},
    )
    scores = rs.score(["p"] * 2, ["ab", "abc"], [None] * 2)
    assert scores.rewards_NK[:, 0].tolist() == [4.0, 6.0]
    # The function's own TimeoutError is an error it raised, not the reward timeout.
    assert scores.messages[f"{HERE}:own_timeout"].endswith(
        "raised TimeoutError: upstream judge timed out"
    )


def test_extra_scorers_are_resolved_first():
    rs = RewardSet(
        [("judge", 1.0, {"scale": 0.5}), ("exact_match", 1.0, {})], extra={"judge": length_async}
    )
    assert rs.score(["p"], ["abcd"], ["abcd"]).rewards_NK.tolist() == [[2.0, 1.0]]
    assert resolve("exact_match", {"exact_match": length_async}) is length_async
    with pytest.raises(RewardError, match="'judge'"):
        resolve("jduge", {"judge": length_async})


def test_bad_values_fail_only_their_samples():
    rs = RewardSet([(f"{HERE}:nan_at_1", 1.0, {})])
    scores = rs.score(["p"] * 6, ["c"] * 6, [None] * 6)
    assert scores.errors_NK[:, 0].tolist() == [False, True, False, True, True, True]
    assert scores.rewards_NK[[0, 2], 0].tolist() == [0.5, 0.25]
    assert scores.rewards_NK[[1, 3, 4, 5], 0].isnan().all()
    assert scores.messages == {
        f"{HERE}:nan_at_1": f"reward '{HERE}:nan_at_1' returned nan for sample 1 (and 3 more)"
    }


def test_wrong_count_or_type_fails_the_column():
    rs = RewardSet([(f"{HERE}:one_short", 1.0, {}), (f"{HERE}:not_a_list", 1.0, {})])
    scores = rs.score(["p"] * 8, ["c"] * 8, [None] * 8)
    assert scores.errors_NK.all() and scores.rewards_NK.isnan().all()
    assert (
        scores.messages[f"{HERE}:one_short"]
        == f"reward '{HERE}:one_short' returned 7 scores for 8 samples"
    )
    assert (
        scores.messages[f"{HERE}:not_a_list"]
        == f"reward '{HERE}:not_a_list' returned a float for 8 samples"
    )


def test_empty_batch_scores_to_empty_tensors():
    scores = RewardSet([("exact_match", 1.0, {}), ("char_match", 1.0, {})]).score([], [], [])
    assert scores.rewards_NK.shape == (0, 2) and scores.errors_NK.shape == (0, 2)
