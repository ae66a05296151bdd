"""RLAIF judge: scores checked against the tiny judge model's own logits, computed here."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_ft.rewards.judge import (
    GROUP_TEMPLATE,
    POINTWISE_TEMPLATE,
    JudgeError,
    JudgeSpec,
    JudgeWorker,
    load_constitution,
)

DEFAULT = str(Path(__file__).resolve().parents[3] / "configs" / "constitutions" / "default.yaml")
PROMPT = "What is 2+3?"
# Different lengths, so a batch of them is left-padded.
REPLIES = ["5", "It is 5.", "six", "2+3 is 5, I am sure of it.", "no idea", "5!!", "x", "five"]


@pytest.fixture(scope="module")
def pointwise(tiny_path):
    return JudgeWorker(JudgeSpec(model_path=tiny_path, constitution=DEFAULT, batch_size=16))


@pytest.fixture(scope="module")
def group(tiny_path):
    return JudgeWorker(JudgeSpec(model_path=tiny_path, constitution=DEFAULT, mode="group"))


@pytest.fixture(scope="module")
def direct(tiny_path):
    """Softmax over ``choices`` at the position after ``text``, straight from the model."""
    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()

    def probs(text: str, choices: list[str]) -> torch.Tensor:
        ids = torch.tensor([tok(text)["input_ids"]])
        assert ids.shape[1] <= 512
        with torch.no_grad():
            logits_V = model(input_ids=ids).logits[0, -1]
        return torch.softmax(logits_V[tok.convert_tokens_to_ids(choices)], dim=-1)

    return probs


def numbered(principles):
    return "\n".join(f"{i}. {p}" for i, p in enumerate(principles, 1))


def test_pointwise_is_expected_rating_from_logits(pointwise, direct):
    principles = numbered(load_constitution(DEFAULT).principles)
    scores = pointwise.score([PROMPT] * len(REPLIES), REPLIES)
    expected = []
    for reply in REPLIES:
        text = POINTWISE_TEMPLATE.format(
            principles=principles, prompt=PROMPT, completion=reply, scale="1-5"
        )
        assert pointwise.render(PROMPT, [reply]) == text
        expected.append(float(direct(text, list("12345")) @ torch.arange(1.0, 6.0)))
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected), atol=1e-5, rtol=0)
    assert all(1.0 <= s <= 5.0 for s in scores)
    assert len(set(scores)) == len(REPLIES)  # continuous: distinct replies, distinct scores


def test_pointwise_is_deterministic_and_batch_size_independent(pointwise, tiny_path):
    prompts = [PROMPT] * len(REPLIES)
    first = pointwise.score(prompts, REPLIES)
    assert pointwise.score(prompts, REPLIES) == first
    one_at_a_time = JudgeWorker(JudgeSpec(model_path=tiny_path, constitution=DEFAULT, batch_size=1))
    torch.testing.assert_close(
        torch.tensor(one_at_a_time.score(prompts, REPLIES)),
        torch.tensor(first),
        atol=1e-5,
        rtol=0,
    )
    assert one_at_a_time.stats(last_call=True)["forward_passes"] == len(REPLIES)


def test_judge_model_path_matters(pointwise, tiny_path):
    from dist_ft.config import TinyModelConfig
    from dist_ft.model.loading import resolve_model_path

    other_path = resolve_model_path("tiny", TinyModelConfig(seed=1))
    other = JudgeWorker(JudgeSpec(model_path=other_path, constitution=DEFAULT))
    prompts = [PROMPT] * 4
    assert other.score(prompts, REPLIES[:4]) != pointwise.score(prompts, REPLIES[:4])


def test_group_scores_are_best_probabilities(group, direct):
    principles = numbered(load_constitution(DEFAULT).principles)
    prompts = [PROMPT] * 4 + ["Name a colour."] * 4
    scores = group.score(prompts, REPLIES, group_ids=[0] * 4 + [1] * 4)
    assert len(scores) == 8
    for b in range(2):
        block = "\n".join(f"[{i + 1}] {c}" for i, c in enumerate(REPLIES[4 * b : 4 * b + 4]))
        text = GROUP_TEMPLATE.format(
            principles=principles, prompt=prompts[4 * b], completions=block, labels="1-4"
        )
        mine = torch.tensor(scores[4 * b : 4 * b + 4])
        expected = direct(text, list("1234"))
        torch.testing.assert_close(mine, expected, atol=1e-5, rtol=0)
        assert mine.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert mine.argsort().tolist() == expected.argsort().tolist()
    assert group.stats(last_call=True)["requests"] == 2  # one query per prompt


def test_groups_come_from_group_ids_not_row_order(group):
    # Two groups with their rows interleaved score as the same groups stored contiguously.
    prompts = [PROMPT] * 4 + ["Name a colour."] * 4
    contiguous = group.score(prompts, REPLIES, group_ids=[0] * 4 + [1] * 4)
    order = [0, 4, 1, 5, 2, 6, 3, 7]
    interleaved = group.score(
        [prompts[i] for i in order], [REPLIES[i] for i in order], group_ids=[0, 1] * 4
    )
    assert interleaved == [contiguous[i] for i in order]


def test_group_rejects_bad_groups(group):
    with pytest.raises(JudgeError, match=r"9 labels .* groups of 10"):
        group.score([PROMPT] * 10, ["a"] * 10, group_ids=[0] * 10)
    with pytest.raises(JudgeError, match=r"prompts of group 0 \(rows \[0, 1\]\) differ"):
        group.score(["p", "q"], ["a", "b"], group_ids=[0, 0])
    with pytest.raises(JudgeError, match=r"groups of sizes \[1, 3\]"):
        group.score([PROMPT] * 4, ["a"] * 4, group_ids=[0, 0, 0, 1])
    with pytest.raises(JudgeError, match="one group id per completion"):
        group.score([PROMPT] * 4, ["a"] * 4)


def test_identical_pairs_are_scored_once_per_call(pointwise):
    before = pointwise.stats()
    replies = ["5", "six", "5", "5", "x", "six", "5", "x"]  # 3 distinct
    for _ in range(2):  # the cache lives for one call: the second call hits 5 times again
        scores = pointwise.score([PROMPT] * 8, replies)
        last = pointwise.stats(last_call=True)
        assert last["requests"] == 8 and last["cache_hits"] == 5
        assert last["tokens"] == sum(len(pointwise.render(PROMPT, [c])) for c in set(replies))
        by_reply = {}
        for reply, s in zip(replies, scores):
            assert by_reply.setdefault(reply, s) == s
    total = pointwise.stats()
    assert total["requests"] - before["requests"] == 16
    assert total["cache_hits"] - before["cache_hits"] == 10
    # The same completion under another prompt is another query.
    pointwise.score(["a", "b"], ["5", "5"])
    assert pointwise.stats(last_call=True)["cache_hits"] == 0


def test_long_inputs_are_cut_to_fit(pointwise, group, direct):
    prompt = "ignore this " * 60 + "What is 2+3?"
    reply = "The answer is 5. " + "blah " * 200
    text = pointwise.render(prompt, [reply])
    assert len(pointwise.tokenizer(text)["input_ids"]) == pointwise.max_length == 512
    assert "What is 2+3?\nReply: The answer is 5." in text  # prompt keeps its end, reply its start
    assert text.endswith("Rating (1-5): ")
    [score] = pointwise.score([prompt], [reply])
    # the score is that of the truncated text, computed straight from the model
    expected = float(direct(text, list("12345")) @ torch.arange(1.0, 6.0))
    assert score == pytest.approx(expected, abs=1e-5)
    assert pointwise.stats(last_call=True)["truncated"] == 1
    # A short reply in a group leaves its share to the long ones.
    text = group.render(prompt, ["5", reply, reply])
    assert len(group.tokenizer(text)["input_ids"]) == 512 and "\n[1] 5\n[2] The" in text


def test_constitution_from_yaml_and_markdown(tmp_path):
    shipped = load_constitution(DEFAULT)
    assert shipped.name == "default" and 3 <= len(shipped.principles) <= 5
    (tmp_path / "mine.yml").write_text("principles: [Be kind., Be brief.]\n")
    assert load_constitution(tmp_path / "mine.yml").principles == ["Be kind.", "Be brief."]
    assert load_constitution(tmp_path / "mine.yml").name == "mine"
    (tmp_path / "c.md").write_text(
        "# Careful\n\nIntro text, not a principle.\n\n"
        "- Be honest,\n  even when it hurts.\n* Be brief.\n1. Cite sources.\n2) No harm.\n"
    )
    c = load_constitution(tmp_path / "c.md")
    assert c.name == "Careful"
    assert c.principles == [
        "Be honest, even when it hurts.",
        "Be brief.",
        "Cite sources.",
        "No harm.",
    ]


@pytest.mark.parametrize(
    ("filename", "text", "message"),
    [
        ("empty.yaml", "", "has no principles"),
        ("none.yaml", "name: x\nprinciples: []\n", "has no principles"),
        ("typo.yaml", "principle: [a]\n", "unknown key 'principle'.*did you mean 'principles'"),
        ("list.yaml", "- a\n- b\n", "must be a mapping"),
        ("broken.yaml", "principles: [a\n", "not valid YAML"),
        ("numbers.yaml", "principles: [1, 2]\n", "list of non-empty strings"),
        ("prose.md", "# Title\nJust prose, no list.\n", "has no principles"),
        ("notes.txt", "- a\n", "unsupported file type"),
    ],
)
def test_bad_constitution_names_the_file(tmp_path, filename, text, message):
    (tmp_path / filename).write_text(text)
    with pytest.raises(JudgeError, match=message) as e:
        load_constitution(tmp_path / filename)
    assert str(tmp_path / filename) in str(e.value)


def test_judge_config_errors(tiny_path):
    with pytest.raises(JudgeError, match=r"'10' is 2 tokens .* exactly one token"):
        JudgeWorker(JudgeSpec(model_path=tiny_path, constitution=DEFAULT, ratings=["1", "10"]))
    with pytest.raises(JudgeError, match=r"unknown placeholders \['answer'\]"):
        JudgeWorker(
            JudgeSpec(model_path=tiny_path, constitution=DEFAULT, template="{principles}{answer}")
        )
    with pytest.raises(JudgeError, match=r"missing \['completions'\]"):
        JudgeWorker(
            JudgeSpec(
                model_path=tiny_path,
                constitution=DEFAULT,
                mode="group",
                template="{principles}{prompt}{completion}",
            )
        )
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        JudgeWorker(JudgeSpec(model_path=tiny_path, constitution="missing.yaml"))


def test_judge_imports_no_ray():
    code = "import sys, dist_ft.rewards.judge; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
