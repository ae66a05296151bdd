import json
import re

import datasets
import pytest
from bad_rows import BAD_KINDS, bad_dataset_layout, write_bad_dataset, write_clean_dataset

from dist_ft.data import (
    DatasetError,
    PromptSampler,
    demo_rows,
    load_rows,
    prepare_prompts,
    write_rejects,
)
from dist_ft.model.loading import load_tokenizer

# Seed 9 puts the first bad row at row 4 (a bad answer), with broken lines after it.
N_GOOD, N_BAD, SEED = 150, 100, 9


def prepare(path, tok, **kw):
    args = dict(
        source=str(path),
        prompt_field="prompt",
        answer_field="answer",
        template="plain",
        plain_template="{prompt}",
        max_prompt_tokens=32,
    )
    args.update(kw)
    return prepare_prompts(load_rows(str(path)), tok, **args)


def write_jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture(scope="module")
def tok(tiny_path):
    return load_tokenizer(tiny_path)


def test_demo_task_is_deterministic_and_verifiable():
    rows = demo_rows(20, seed=3)
    assert rows == demo_rows(20, seed=3)
    for r in rows:
        assert r["answer"] == r["prompt"][len("Repeat ")] * 4


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"answer": "x"}, r"row 2: field 'prompt': missing"),
        ({"prompt": None}, r"row 2: field 'prompt': missing"),
        ({"prompt": 5}, r"row 2: field 'prompt': expected a string, got int"),
        ({"prompt": "   "}, r"row 2: field 'prompt': empty prompt"),
        ({"prompt": "x" * 100}, r"row 2: field 'prompt': 100 tokens exceeds"),
        ({"prompt": "ok", "answer": ["a"]}, r"row 2: field 'answer': expected a string"),
        ({"prompt": "a\ud800"}, r"row 2: field 'prompt': lone surrogate at character 1"),
    ],
)
def test_malformed_row_names_file_row_and_field(tmp_path, tok, bad, match):
    p = write_jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b"}, bad])
    with pytest.raises(DatasetError, match=str(p) + ": " + match):
        prepare(p, tok)


@pytest.mark.parametrize(
    "line,match",
    [
        (b'{"prompt": "\xff\xfe"}', r"invalid UTF-8"),
        (b'{"prompt": ', r"invalid JSON"),
        (b"[1, 2]", r"expected a JSON object, got list"),
        (b"  ", r"empty line"),
    ],
)
def test_broken_line_names_the_row(tmp_path, tok, line, match):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"prompt": "a"}\n' + line + b"\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl: row 1: " + match):
        prepare(p, tok)


def test_first_bad_row_in_file_order_wins(tmp_path, tok):
    # A broken line after a row that fails validation must not be reported first, and vice versa.
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "a"}\n{"answer": "x"}\n{"prompt": \n')
    with pytest.raises(DatasetError, match=r"row 1: field 'prompt': missing"):
        prepare(p, tok)
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": \n{"answer": "x"}\n')
    with pytest.raises(DatasetError, match=r"row 1: invalid JSON"):
        prepare(p, tok)


def test_template_error_names_row(tmp_path, tok):
    p = write_jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(DatasetError, match=r"row 0: field 'prompt': template error"):
        prepare(p, tok, plain_template="{prompt} {missing}")
    # A template that fails every row leaves nothing to skip to.
    with pytest.raises(DatasetError, match=r"no usable rows \(2 rejected; first: .*template error"):
        prepare(p, tok, plain_template="{prompt} {missing}", on_bad_row="skip")


def test_chat_template_exception_is_a_template_error(tmp_path, tiny_path):
    tok = load_tokenizer(tiny_path)  # a fresh one: the module's is shared
    tok.chat_template = (
        "{% if 'secret' in messages[0]['content'] %}{{ raise_exception('no secrets') }}{% endif %}"
        "{{ messages[0]['content'] }}"
    )
    p = write_jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "a secret"}, {"prompt": "b"}])
    with pytest.raises(DatasetError, match=r"row 1: field 'prompt': template error: no secrets"):
        prepare(p, tok, template="chat")
    prepared = prepare(p, tok, template="chat", on_bad_row="skip")
    assert [p.index for p in prepared.prompts] == [0, 2]
    assert [r.row for r in prepared.rejects] == [1]


def test_empty_source_has_no_usable_rows(tmp_path, tok):
    p = tmp_path / "empty.jsonl"
    p.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty.jsonl: no usable rows \(the source is empty\)"):
        prepare(p, tok, on_bad_row="skip")


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    first = write_bad_dataset(d / "bad.jsonl", N_GOOD, N_BAD, SEED)
    write_clean_dataset(d / "clean.jsonl", N_GOOD, SEED)
    return d, first


def test_error_mode_reports_first_bad_row(bad_dataset, tok):
    d, (row, field) = bad_dataset
    assert (row, field) == (4, "answer")
    named = "" if field is None else f"field '{field}': "
    with pytest.raises(DatasetError, match=re.escape(f"{d / 'bad.jsonl'}: row {row}: {named}")):
        prepare(d / "bad.jsonl", tok)


def test_skip_mode_rejects_exactly_the_bad_rows(bad_dataset, tok, tmp_path):
    d, _ = bad_dataset
    source = str(d / "bad.jsonl")
    prepared = prepare(source, tok, on_bad_row="skip")
    layout = bad_dataset_layout(N_GOOD, N_BAD, SEED)
    assert len(prepared.rejects) == N_BAD
    assert [r.row for r in prepared.rejects] == [i for i, k in enumerate(layout) if k]
    for r in prepared.rejects:
        _, field, reason = BAD_KINDS[layout[r.row]]
        assert (r.source, r.field) == (source, field), r
        assert re.search(reason, r.reason), r
    assert {layout[r.row] for r in prepared.rejects} == set(BAD_KINDS)
    by_kind = {layout[r.row]: r for r in prepared.rejects}
    assert "\ufffd" in by_kind["invalid_utf8"].raw
    assert json.loads(by_kind["wrong_type"].raw) == {"prompt": 7, "answer": "aaaa"}

    # the good rows are the clean file's prompts, in order, under their row index in the source
    clean = prepare(d / "clean.jsonl", tok).prompts
    assert [(p.text, p.answer) for p in prepared.prompts] == [(p.text, p.answer) for p in clean]
    assert [p.index for p in prepared.prompts] == [i for i, k in enumerate(layout) if k is None]

    write_rejects(tmp_path / "rejects.jsonl", prepared.rejects)
    lines = (tmp_path / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == N_BAD
    records = [json.loads(line) for line in lines]
    assert all(list(rec) == ["source", "row", "field", "reason", "raw"] for rec in records)
    assert [rec["row"] for rec in records] == [r.row for r in prepared.rejects]
    assert [rec["raw"] for rec in records] == [r.raw for r in prepared.rejects]


def test_parquet_disk_and_chat_template(tmp_path, tok):
    ds = datasets.Dataset.from_list(load_rows("demo", demo_size=5))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for src in (tmp_path / "d.parquet", tmp_path / "saved"):
        prompts = prepare(src, tok, template="chat").prompts
        assert len(prompts) == 5
        assert prompts[0].text.startswith("<|user|>") and prompts[0].text.endswith("<|assistant|>")
        assert prompts[0].answer == ds[0]["answer"]


def test_sampler_resumes_exactly():
    a = PromptSampler(10, seed=1)
    first = a.next(7)
    b = PromptSampler(10, seed=1)
    b.load_state_dict(a.state_dict())
    assert a.next(25) == b.next(25)
    # every epoch is a permutation: nothing skipped, nothing repeated within an epoch
    c = PromptSampler(10, seed=1)
    assert sorted(c.next(10)) == list(range(10))
    assert first == PromptSampler(10, seed=1).next(7)


def test_chat_message_prompts_render_through_the_template(tmp_path, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = write_jsonl(tmp_path, [{"prompt": messages, "answer": "x"}])
    (prompt,) = prepare(path, tok, template="chat", max_prompt_tokens=64).prompts
    assert prompt.text == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    with pytest.raises(DatasetError, match=r"row 0: field 'prompt'"):
        prepare(path, tok, template="plain")  # a message list needs the chat template
    bad = write_jsonl(tmp_path, [{"prompt": [{"role": "robot", "content": "x"}]}], "bad.jsonl")
    with pytest.raises(DatasetError, match=r"field 'prompt\[0\]\.role': unknown role 'robot'"):
        prepare(bad, tok, template="chat", max_prompt_tokens=64)
