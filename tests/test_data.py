import json

import datasets
import pytest

from dist_ft.data import DatasetError, PromptSampler, demo_rows, load_rows, prepare_prompts
from dist_ft.models import load_tokenizer


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
        ({"answer": "x"}, r"row 2: missing field 'prompt'"),
        ({"prompt": 5}, r"row 2: field 'prompt': expected a string, got int"),
        ({"prompt": "   "}, r"row 2: field 'prompt': empty prompt"),
        ({"prompt": "x" * 100}, r"row 2: field 'prompt': 100 tokens exceeds"),
        ({"prompt": "ok", "answer": ["a"]}, r"row 2: field 'answer': expected a string"),
    ],
)
def test_malformed_row_names_file_row_and_field(tmp_path, tok, bad, match):
    p = write_jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b"}, bad])
    with pytest.raises(DatasetError, match=str(p) + ": " + match):
        prepare(p, tok)


def test_invalid_utf8_and_json_name_the_row(tmp_path, tok):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl: row 1: invalid UTF-8"):
        prepare(p, tok)
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DatasetError, match=r"bad.jsonl: row 1: invalid JSON"):
        prepare(p, tok)


def test_template_error_names_row(tmp_path, tok):
    p = write_jsonl(tmp_path, [{"prompt": "a"}])
    with pytest.raises(DatasetError, match=r"row 0: field 'prompt': template error"):
        prepare(p, tok, plain_template="{prompt} {missing}")


def test_parquet_disk_and_chat_template(tmp_path, tok):
    ds = datasets.Dataset.from_list(load_rows("demo", demo_size=5))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for src in (tmp_path / "d.parquet", tmp_path / "saved"):
        prompts = prepare(src, tok, template="chat")
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
