"""SFT and preference rows (dist_ft/data.py) and packing (dist_ft/wire/packing.py). No model: the
tiny character-level tokenizer is built in memory, so every expected token position is exact (one
character, one token)."""

import json
import re

import datasets
import pytest
import torch

from dist_ft.data import DatasetError, load_rows, prepare_preferences, prepare_sft, write_rejects
from dist_ft.model.tiny import build_tokenizer
from dist_ft.wire.batch import Span
from dist_ft.wire.packing import (
    block_causal_mask,
    example_sums,
    pack_examples,
    pad_examples,
    scored_targets,
)

C, T, P = int(Span.CONTEXT), int(Span.TRAINED), int(Span.PAD)
CHAT = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "x"},
    {"role": "assistant", "content": "z"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def fresh_tok():
    return build_tokenizer()  # for tests that change the chat template


def write_jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def sft(path, tok, **kw):
    args = dict(source=str(path), template="plain", plain_template="{prompt}")
    return prepare_sft(load_rows(str(path)), tok, **(args | kw))


def prefs(path, tok, **kw):
    args = dict(source=str(path), template="plain", plain_template="{prompt}")
    return prepare_preferences(load_rows(str(path)), tok, **(args | kw))


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def trained_text(tok, example):
    return tok.decode(example.ids[example.spans == T].tolist())


# --- SFT: masks --------------------------------------------------------------------------------


def test_completion_only_mask_on_exact_positions(tmp_path, tok):
    p = write_jsonl(tmp_path, [{"prompt": "ab", "completion": "cde"}])
    (ex,) = sft(p, tok, plain_template="Q:{prompt}\n").examples
    # "Q:ab\n" is 5 context tokens; then c, d, e and EOS are trained.
    assert ex.ids.tolist() == [*ids_of(tok, "Q:ab\ncde"), tok.eos_token_id]
    assert ex.spans.tolist() == [C] * 5 + [T] * 4
    assert ex.ids.dtype == torch.int32 and ex.spans.dtype == torch.int8
    assert (ex.index, ex.truncated) == (0, False)


def test_prompt_template_chat_renders_the_prompt_as_the_rl_path_does(tmp_path, tok):
    p = write_jsonl(tmp_path, [{"prompt": "ab", "completion": "c"}])
    (ex,) = sft(p, tok, template="chat").examples
    assert tok.decode(ex.ids.tolist()) == "<|user|>ab\n<|assistant|>c</s>"
    assert trained_text(tok, ex) == "c</s>"
    assert ex.spans.tolist()[-2:] == [T, T] and set(ex.spans.tolist()[:-2]) == {C}


def test_chat_rows_train_assistant_turns_only(tmp_path, tok):
    (ex,) = sft(write_jsonl(tmp_path, [{"messages": CHAT}]), tok).examples
    text = "<|system|>s\n<|user|>hi\n<|assistant|>yo\n<|user|>x\n<|assistant|>z\n"
    assert tok.decode(ex.ids.tolist()) == text
    # Tokens: <|system|> s \n <|user|> h i \n <|assistant|> [y o \n] <|user|> x \n <|assistant|>
    # [z \n]: each assistant turn's content and its end of turn, nothing else.
    assert ex.spans.tolist() == [C] * 8 + [T] * 3 + [C] * 4 + [T] * 2


def test_chat_mask_follows_any_prefix_stable_template(tmp_path, fresh_tok):
    fresh_tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<END>{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    (ex,) = sft(write_jsonl(tmp_path, [{"messages": CHAT}]), fresh_tok).examples
    assert trained_text(fresh_tok, ex) == "yo<END>z<END>"
    # The role header of an assistant turn is context, not trained.
    first = ex.spans.tolist().index(T)
    assert fresh_tok.decode(ex.ids[:first].tolist()).endswith("[assistant]")


def test_template_that_rewrites_earlier_turns_is_a_bad_row(tmp_path, fresh_tok):
    # Drops the content of every assistant turn but the last, as reasoning templates do: the
    # conversation up to turn 2 is then not a prefix of the whole, and the diff cannot be trusted.
    fresh_tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "<|assistant|>...\n{% else %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    p = write_jsonl(tmp_path, [{"messages": CHAT}])
    with pytest.raises(DatasetError, match=r"row 0: field 'messages': .*message 2 differently"):
        sft(p, fresh_tok)


def test_no_chat_template_fails_even_when_skipping(tmp_path, fresh_tok):
    fresh_tok.chat_template = None
    p = write_jsonl(tmp_path, [{"prompt": "a", "completion": "b"}, {"messages": CHAT}])
    for mode in ("error", "skip"):  # skipping would reject every chat row for the setup's fault
        with pytest.raises(
            DatasetError,
            match=re.escape(f"{p}: row 1: field 'messages': the tokenizer has no chat"),
        ):
            sft(p, fresh_tok, on_bad_row=mode)


# --- SFT: validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"prompt": "a"}, r"field 'completion': missing"),
        ({"prompt": "a", "completion": 3}, r"field 'completion': expected a string, got int"),
        ({"prompt": "a", "completion": " "}, r"field 'completion': empty completion"),
        ({"completion": "b"}, r"field 'prompt': missing"),
        ({"prompt": "a\ud800", "completion": "b"}, r"field 'prompt': lone surrogate"),
        ({"messages": "hi"}, r"field 'messages': expected a list of messages, got str"),
        ({"messages": []}, r"field 'messages': empty conversation"),
        ({"messages": [CHAT[1], "x"]}, r"field 'messages\[1\]': expected a message object"),
        ({"messages": [{"content": "a"}]}, r"field 'messages\[0\].role': missing"),
        (
            {"messages": [CHAT[1], {"role": "assistant", "content": 5}]},
            r"field 'messages\[1\].content': expected a string, got int",
        ),
        (
            {"messages": [CHAT[1], {"role": "assistant", "content": "\ud800"}]},
            r"field 'messages\[1\].content': lone surrogate at character 0",
        ),
        ({"messages": CHAT[:2]}, r"field 'messages': no assistant turn to train on"),
        ({"messages": CHAT, "prompt": "a"}, r"field 'messages': a row has either messages or"),
    ],
)
def test_bad_sft_row_names_file_row_and_field(tmp_path, tok, bad, match):
    p = write_jsonl(tmp_path, [{"prompt": "a", "completion": "b"}, bad])
    with pytest.raises(DatasetError, match=re.escape(f"{p}: row 1: ") + match):
        sft(p, tok)


def test_a_chat_row_with_an_unknown_role_is_refused_or_skipped(tmp_path, tok):
    robot = {"messages": [CHAT[1], {"role": "robot", "content": "beep"}]}
    p = write_jsonl(tmp_path, [{"prompt": "a", "completion": "b"}, robot])
    with pytest.raises(DatasetError) as e:
        sft(p, tok)
    assert str(e.value) == (
        f"{p}: row 1: field 'messages[1].role': unknown role 'robot' "
        "(allowed: system, user, assistant, tool)"
    )
    prepared = sft(p, tok, on_bad_row="skip")
    assert [x.index for x in prepared.examples] == [0]
    assert [(r.row, r.field) for r in prepared.rejects] == [(1, "messages[1].role")]


def test_first_bad_row_in_file_order_and_skip_writes_rejects(tmp_path, tok):
    p = tmp_path / "mixed.jsonl"
    lines = [
        b'{"prompt": "a", "completion": "b"}',
        b'{"prompt": "a"}',  # row 1: missing completion
        b'{"prompt": ',  # row 2: broken line
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}',
        b'{"messages": [{"role": "user"}]}',  # row 4
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DatasetError, match=r"row 1: field 'completion': missing"):
        sft(p, tok)
    prepared = sft(p, tok, on_bad_row="skip")
    assert [e.index for e in prepared.examples] == [0, 3]
    assert [(r.row, r.field) for r in prepared.rejects] == [
        (1, "completion"),
        (2, None),
        (4, "messages[0].content"),
    ]
    write_rejects(tmp_path / "rejects.jsonl", prepared.rejects)
    written = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(w["source"], w["row"], w["field"]) for w in written] == [
        (str(p), 1, "completion"),
        (str(p), 2, None),
        (str(p), 4, "messages[0].content"),
    ]
    assert written[2]["raw"] == json.dumps({"messages": [{"role": "user"}]})


def test_all_rows_bad_has_no_usable_rows(tmp_path, tok):
    p = write_jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(DatasetError, match=r"no usable rows \(2 rejected; first: .*completion"):
        sft(p, tok, on_bad_row="skip")


def test_truncation_is_counted_and_keeps_the_prompt(tmp_path, tok):
    rows = [
        {"prompt": "ab", "completion": "cdef"},  # 7 tokens with EOS: cut to 4
        {"prompt": "ab", "completion": "c"},  # 4 tokens: fits exactly
        {"messages": CHAT},  # 17 tokens: cut to 4, all context
    ]
    p = write_jsonl(tmp_path, rows)
    with pytest.raises(DatasetError, match=r"row 2: field 'messages': no trained tokens in the"):
        sft(p, tok, max_length=4)
    prepared = sft(p, tok, max_length=4, on_bad_row="skip")
    assert prepared.num_truncated == 1
    cut, whole = prepared.examples
    assert tok.decode(cut.ids.tolist()) == "abcd" and cut.spans.tolist() == [C, C, T, T]
    assert cut.truncated and not whole.truncated
    assert [r.row for r in prepared.rejects] == [2]
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        sft(p, tok, max_length=1)


def test_parquet_and_saved_dataset_with_both_row_forms(tmp_path, tok):
    # One file mixing both forms: the columns are unified, so each row has the other's as None.
    rows = [{"prompt": "ab", "completion": "c"}, {"messages": CHAT[1:3]}]
    jsonl = write_jsonl(tmp_path, rows)
    ds = datasets.Dataset.from_json(str(jsonl), cache_dir=str(tmp_path / "cache"))
    assert ds[0]["messages"] is None and ds[1]["prompt"] is None
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    expected = sft(jsonl, tok).examples
    for source in (tmp_path / "d.parquet", tmp_path / "saved"):
        got = sft(source, tok).examples
        assert [(e.ids.tolist(), e.spans.tolist()) for e in got] == [
            (e.ids.tolist(), e.spans.tolist()) for e in expected
        ]


# --- Preference pairs --------------------------------------------------------------------------


def test_text_pairs_share_prompt_and_train_answers(tmp_path, tok):
    p = write_jsonl(tmp_path, [{"prompt": "ab", "chosen": "cd", "rejected": "e", "margin": 2.5}])
    prepared = prefs(p, tok)
    (pair,) = prepared.pairs
    assert pair.index == pair.chosen.index == pair.rejected.index == 0
    assert pair.chosen.ids.tolist() == [*ids_of(tok, "abcd"), tok.eos_token_id]
    assert pair.chosen.spans.tolist() == [C, C, T, T, T]
    assert pair.rejected.ids.tolist() == [*ids_of(tok, "abe"), tok.eos_token_id]
    assert pair.rejected.spans.tolist() == [C, C, T, T]
    assert (prepared.num_truncated, prepared.rejects) == (0, [])


def test_chat_pairs_with_a_prompt_list(tmp_path, tok):
    row = {
        "prompt": CHAT[:2],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    (pair,) = prefs(write_jsonl(tmp_path, [row]), tok).pairs
    assert tok.decode(pair.chosen.ids.tolist()) == "<|system|>s\n<|user|>hi\n<|assistant|>good\n"
    assert trained_text(tok, pair.chosen) == "good\n"
    assert trained_text(tok, pair.rejected) == "bad\n"
    n = len(ids_of(tok, "<|system|>s\n<|user|>hi\n<|assistant|>"))
    assert pair.chosen.ids[:n].tolist() == pair.rejected.ids[:n].tolist()
    assert set(pair.chosen.spans[:n].tolist()) == set(pair.rejected.spans[:n].tolist()) == {C}


def test_chat_pairs_as_whole_conversations_train_only_after_the_shared_turns(tmp_path, tok):
    # The shared history holds an assistant turn ("yo"): context here, unlike in SFT.
    row = {"chosen": [*CHAT[:4], {"role": "assistant", "content": "ok"}], "rejected": CHAT}
    (pair,) = prefs(write_jsonl(tmp_path, [row]), tok).pairs
    assert trained_text(tok, pair.chosen) == "ok\n"
    assert trained_text(tok, pair.rejected) == "z\n"


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"prompt": "a", "chosen": "b"}, r"field 'rejected': missing"),
        ({"prompt": "a", "chosen": 1, "rejected": "c"}, r"field 'chosen': expected a string"),
        ({"chosen": "b", "rejected": "c"}, r"field 'prompt': missing"),
        ({"prompt": "a", "chosen": "b", "rejected": "b"}, r"field 'rejected': identical"),
        (
            {"prompt": "a", "chosen": [CHAT[2]], "rejected": [CHAT[4]]},
            r"field 'prompt': expected a message list",
        ),
        ({"chosen": CHAT[1:3], "rejected": "c"}, r"field 'rejected': expected a list of messages"),
        ({"chosen": CHAT[1:3], "rejected": CHAT[1:3]}, r"field 'rejected': identical"),
        (
            {"chosen": CHAT[1:3], "rejected": [CHAT[1], {"role": "user", "content": "?"}]},
            r"field 'rejected': no assistant turn after the messages both sides share",
        ),
        ({"chosen": CHAT[1:3], "rejected": CHAT[1:4]}, r"field 'chosen': no assistant turn"),
        ({"chosen": CHAT[1:3], "rejected": [{"role": 1}]}, r"field 'rejected\[0\].role'"),
    ],
)
def test_bad_pair_row_names_file_row_and_field(tmp_path, tok, bad, match):
    p = write_jsonl(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}, bad])
    with pytest.raises(DatasetError, match=re.escape(f"{p}: row 1: ") + match):
        prefs(p, tok)
    prepared = prefs(p, tok, on_bad_row="skip")
    assert [q.index for q in prepared.pairs] == [0] and [r.row for r in prepared.rejects] == [1]


@pytest.mark.parametrize(
    "bad,message",
    [
        (
            {"chosen": [CHAT[1], {"role": "wizard", "content": "x"}], "rejected": CHAT[1:3]},
            "field 'chosen[1].role': unknown role 'wizard' "
            "(allowed: system, user, assistant, tool)",
        ),
        (
            {"prompt": [CHAT[1]], "chosen": 123, "rejected": [CHAT[2]]},
            "field 'chosen': expected a list of messages, got int",
        ),
        (
            {"prompt": "q", "chosen": 123, "rejected": [CHAT[2]]},
            "field 'chosen': expected a list of messages, got int",
        ),
        (
            {"prompt": "q", "chosen": 123, "rejected": "c"},
            "field 'chosen': expected a string, got int",
        ),
    ],
)
def test_a_bad_answer_in_a_pair_is_blamed_on_itself(tmp_path, tok, bad, message):
    p = write_jsonl(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}, bad])
    with pytest.raises(DatasetError) as e:
        prefs(p, tok)
    assert str(e.value) == f"{p}: row 1: {message}"


def test_pair_truncation_counts_pairs(tmp_path, tok):
    rows = [
        {"prompt": "ab", "chosen": "cdef", "rejected": "g"},  # chosen cut
        {"prompt": "ab", "chosen": "c", "rejected": "d"},  # neither
    ]
    prepared = prefs(write_jsonl(tmp_path, rows), tok, max_length=4)
    assert prepared.num_truncated == 1
    assert [len(q.chosen.ids) for q in prepared.pairs] == [4, 4]
    assert prepared.pairs[0].chosen.truncated and not prepared.pairs[0].rejected.truncated


# --- Packing -----------------------------------------------------------------------------------


def examples(lengths, trained_from=1):
    """Example e: ids 10e+1, 10e+2, ...; context up to ``trained_from``, trained after."""
    ids = [torch.arange(1, n + 1, dtype=torch.int32) + 10 * e for e, n in enumerate(lengths)]
    spans = [torch.tensor([C] * trained_from + [T] * (n - trained_from)) for n in lengths]
    return ids, [s.to(torch.int8) for s in spans]


def test_first_fit_layout_positions_restart_and_padding():
    ids, spans = examples([5, 3, 4, 2, 6])
    packed = pack_examples(ids, spans, max_tokens=8, pad_id=0)
    # First fit in order: row 0 takes 5 + 3; 4 and 2 open and fill row 1 (6/8); 6 opens row 2.
    assert packed.example_ids_NT.tolist() == [
        [0, 0, 0, 0, 0, 1, 1, 1],
        [2, 2, 2, 2, 3, 3, -1, -1],
        [4, 4, 4, 4, 4, 4, -1, -1],
    ]
    assert packed.position_ids_NT.tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 2, 3, 0, 1, 0, 1],
        [0, 1, 2, 3, 4, 5, 0, 1],
    ]
    assert packed.ids_NT[1].tolist() == [21, 22, 23, 24, 31, 32, 0, 0]
    assert packed.spans_NT[1].tolist() == [C, T, T, T, C, T, P, P]
    assert packed.ids_NT.dtype == torch.long and packed.spans_NT.dtype == torch.int8
    # Every example lands whole, in one row, in input order within it.
    for e, (i, s) in enumerate(zip(ids, spans)):
        where = packed.example_ids_NT == e
        assert packed.ids_NT[where].tolist() == i.tolist()
        assert packed.spans_NT[where].tolist() == s.tolist()
        assert where.any(1).sum() == 1


def test_packing_is_deterministic_and_no_wider_than_needed():
    ids, spans = examples([3, 7, 2, 2, 5, 1, 4])
    a, b = pack_examples(ids, spans, 9), pack_examples(ids, spans, 9)
    for name in ("ids_NT", "spans_NT", "position_ids_NT", "example_ids_NT"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.ids_NT.shape[1] == 9
    assert pack_examples(ids[:1], spans[:1], 9).ids_NT.shape == (1, 3)


def test_packing_never_splits_an_example():
    ids, spans = examples([3, 9])
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than max_tokens=8"):
        pack_examples(ids, spans, 8)
    with pytest.raises(ValueError, match="2 id sequences but 1 span"):
        pack_examples(ids, spans[:1], 16)


def test_block_causal_mask():
    example_ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
    allowed = block_causal_mask(example_ids, dtype=torch.bool)
    assert allowed.shape == (1, 1, 6, 6)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],  # padding sees itself: no fully masked row
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed[0, 0], expected)
    additive = block_causal_mask(example_ids, dtype=torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive[0, 0] == 0, expected)
    assert (additive[0, 0][~expected] == torch.finfo(torch.bfloat16).min).all()


def test_scored_targets_and_example_sums():
    ids, spans = examples([3, 2], trained_from=1)
    packed = pack_examples(ids, spans, 8)  # one row of 5: [e0 e0 e0 e1 e1]
    scored = scored_targets(packed.spans_NT, packed.example_ids_NT)
    # Logits at 0, 1 score e0's trained tokens; at 3, e1's. Logits at 2 would score e1's first
    # token from e0's last, which is no target.
    assert scored.tolist() == [[True, True, False, True]]
    values = torch.arange(1.0, 5.0)[None]  # one value per target position
    sums = example_sums(values, packed.example_ids_NT[:, 1:], scored, num_examples=2)
    assert sums.tolist() == [1.0 + 2.0, 4.0]


def test_pad_examples():
    ids, spans = examples([3, 1])
    ids_NT, spans_NT = pad_examples(ids, spans, pad_id=0)
    assert ids_NT.tolist() == [[1, 2, 3], [11, 0, 0]]
    assert spans_NT.tolist() == [[C, T, T], [C, P, P]]
