"""RLAIF labelling's pairwise judge (``JudgeWorker.compare``): position-debiased margins,
checked against the tiny judge's own logits and against a judge with a built-in slot bias."""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_ft.rewards.judge import GROUP_TEMPLATE, JudgeSpec, JudgeWorker, load_constitution

DEFAULT = str(Path(__file__).resolve().parents[3] / "configs" / "constitutions" / "default.yaml")
PROMPTS = ["What is 2+3?", "What is 2+3?", "Name a colour.", "Name a colour."]
FIRSTS = ["5", "It is 5.", "red", "blue, I think"]
SECONDS = ["six", "2+3 is 5, I am sure.", "no idea", "blue, I think"]  # the last pair: a tie


@pytest.fixture(scope="module")
def judge(tiny_path):
    return JudgeWorker(JudgeSpec(model_path=tiny_path, constitution=DEFAULT))


def numbered(principles):
    return "\n".join(f"{i}. {p}" for i, p in enumerate(principles, 1))


def test_margin_is_the_first_slot_probability_in_one_order_minus_the_other(judge, tiny_path):
    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    ids_K = tok.convert_tokens_to_ids(["1", "2"])

    def p_first(principles: str, prompt: str, a: str, b: str) -> float:
        text = GROUP_TEMPLATE.format(
            principles=principles, prompt=prompt, completions=f"[1] {a}\n[2] {b}", labels="1-2"
        )
        with torch.no_grad():
            logits_V = model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits[0, -1]
        return float(torch.softmax(logits_V[ids_K], -1)[0])

    principles = load_constitution(DEFAULT).principles
    margins, per_principle = judge.compare(PROMPTS, FIRSTS, SECONDS)
    for i, (p, a, b) in enumerate(zip(PROMPTS, FIRSTS, SECONDS)):
        whole = numbered(principles)
        assert margins[i] == pytest.approx(
            p_first(whole, p, a, b) - p_first(whole, p, b, a), abs=1e-5
        )
        expected = [
            p_first(numbered([c]), p, a, b) - p_first(numbered([c]), p, b, a) for c in principles
        ]
        assert per_principle[i] == pytest.approx(expected, abs=1e-5)
    assert margins[3] == 0.0 and per_principle[3] == [0.0] * 4  # a tie is exactly even


def test_swapping_a_pair_negates_its_margins_exactly(judge):
    margins, per = judge.compare(PROMPTS, FIRSTS, SECONDS)
    swapped, per_swapped = judge.compare(PROMPTS, SECONDS, FIRSTS)
    assert swapped == [-m for m in margins]
    assert per_swapped == [[-m for m in row] for row in per]
    assert all(-1 <= m <= 1 for m in margins) and any(m != 0 for m in margins)


def test_a_slot_bias_cancels_and_the_two_orders_are_averaged(judge, monkeypatch):
    """A judge that gives slot 1 a 0.7 head start whatever it holds, plus 0.01 per character
    of lead: each order alone is biased, their average is the content's lead only."""
    seen = []

    def biased(texts, choice_ids):
        seen.extend(texts)
        p1 = []
        for text in texts:
            a, b = re.search(r"\[1\] (.*)\n\[2\] (.*)\nBest reply", text).groups()
            p1.append(0.7 + 0.01 * (len(a) - len(b)))
        p1_Q = torch.tensor(p1)
        return torch.stack([p1_Q, 1 - p1_Q], dim=1)

    monkeypatch.setattr(judge, "_choice_probs", biased)
    margins, per_principle = judge.compare(PROMPTS, FIRSTS, SECONDS)
    lead = [0.02 * (len(a) - len(b)) for a, b in zip(FIRSTS, SECONDS)]
    assert margins == pytest.approx(lead)
    torch.testing.assert_close(
        torch.tensor(per_principle), torch.tensor(lead)[:, None].expand(4, 4)
    )
    # Each pair in both orders, under the whole constitution and each principle alone; the
    # tie's two orders are one query.
    assert judge.stats(last_call=True)["requests"] == 4 * 2 * 5
    assert judge.stats(last_call=True)["cache_hits"] == 5
    principles = load_constitution(DEFAULT).principles
    alone = [t for t in seen if "2. " not in t.split("Prompt:")[0]]
    assert len(alone) == 4 * (3 * 2 + 1)
    assert {sum(p in t for p in principles) for t in alone} == {1}


def test_a_group_judge_compares_with_its_own_template_and_a_one_principle_constitution(
    tiny_path, tmp_path
):
    one = tmp_path / "one.yaml"
    one.write_text("principles: [Be brief.]\n")
    group = JudgeWorker(JudgeSpec(model_path=tiny_path, constitution=str(one), mode="group"))
    margins, per = group.compare(PROMPTS[:2], FIRSTS[:2], SECONDS[:2])
    assert per == [[m] for m in margins]  # one principle: judged once, not twice
    assert group.stats(last_call=True)["requests"] == 4
    assert group.constitution.sha256() == load_constitution(one).sha256()


def test_constitution_hash_is_of_the_principles_the_judge_reads(tmp_path):
    yaml_file, md_file = tmp_path / "a.yaml", tmp_path / "b.md"
    yaml_file.write_text("# comment\nprinciples:\n  - Be honest.\n  - Be   brief.\n")
    md_file.write_text("# Title\n\n- Be honest.\n- Be brief.\n")
    assert load_constitution(yaml_file).sha256() == load_constitution(md_file).sha256()
    md_file.write_text("- Be honest.\n- Be kind.\n")
    assert load_constitution(yaml_file).sha256() != load_constitution(md_file).sha256()
