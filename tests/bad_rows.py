"""A jsonl dataset with bad rows of every kind that ``prepare_prompts`` rejects, interleaved with
good demo-task rows, and the same good rows alone for comparison.

Kinds of bad row (0-based file rows; the field is the one an error names, None for a line that is
not a JSON object):

- missing_field, wrong_type, empty_prompt: the prompt field is absent, an int, or blank.
- over_length: a prompt of about 3,000 tokens (any tokenizer that gives "a " about one token),
  over any ``max_prompt_tokens`` a test uses.
- bad_answer: the answer is a list.
- lone_surrogate: the JSON escape ``\\ud800`` decodes to a str the tokenizer cannot encode.
- invalid_utf8, invalid_json, not_object, empty_line: the line itself is broken.

Template errors are not among them: no row's content can make ``"{prompt}"`` or the tiny model's
chat template fail. test_data.py covers them with a bad template instead.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dist_ft.data import demo_rows

# kind -> (line without its newline, field named in the error, regex for the reason)
BAD_KINDS: dict[str, tuple[bytes, str | None, str]] = {
    "missing_field": (b'{"answer": "aaaa"}', "prompt", r"^missing$"),
    "wrong_type": (b'{"prompt": 7, "answer": "aaaa"}', "prompt", r"expected a string, got int"),
    "empty_prompt": (b'{"prompt": "  ", "answer": "aaaa"}', "prompt", r"empty prompt"),
    "over_length": (
        json.dumps({"prompt": "Repeat " + "a " * 3000, "answer": "aaaa"}).encode(),
        "prompt",
        r"\d+ tokens exceeds data.max_prompt_tokens",
    ),
    "bad_answer": (
        b'{"prompt": "Repeat a:", "answer": ["aaaa"]}',
        "answer",
        r"expected a string or number, got list",
    ),
    "lone_surrogate": (
        b'{"prompt": "Repeat \\ud800:", "answer": "aaaa"}',
        "prompt",
        r"lone surrogate",
    ),
    "invalid_utf8": (b'{"prompt": "Repeat \xff:", "answer": "aaaa"}', None, r"invalid UTF-8"),
    "invalid_json": (b'{"prompt": "Repeat a:", "answer": ', None, r"invalid JSON"),
    "not_object": (b'["Repeat a:", "aaaa"]', None, r"expected a JSON object, got list"),
    "empty_line": (b"", None, r"empty line"),
}


def bad_dataset_layout(n_good: int, n_bad: int, seed: int) -> list[str | None]:
    """The kind of each row in file order, None for a good row. Kinds are dealt in turn, so each
    appears ``n_bad // len(BAD_KINDS)`` times or once more; positions are a seeded shuffle."""
    kinds = list(BAD_KINDS)
    layout: list[str | None] = [None] * n_good + [kinds[j % len(kinds)] for j in range(n_bad)]
    random.Random(seed).shuffle(layout)
    return layout


def _good_lines(n_good: int, seed: int) -> list[bytes]:
    return [json.dumps(row).encode() for row in demo_rows(n_good, seed)]


def write_bad_dataset(
    path: str | Path, n_good: int, n_bad: int, seed: int
) -> tuple[int, str | None]:
    """Write the mixed dataset. Returns the first bad row's index and the field its error names
    (None for a broken line)."""
    good = iter(_good_lines(n_good, seed))
    layout = bad_dataset_layout(n_good, n_bad, seed)
    lines = [next(good) if kind is None else BAD_KINDS[kind][0] for kind in layout]
    Path(path).write_bytes(b"".join(line + b"\n" for line in lines))
    first = next(i for i, kind in enumerate(layout) if kind is not None)
    return first, BAD_KINDS[layout[first]][1]


def write_clean_dataset(path: str | Path, n_good: int, seed: int) -> None:
    """Only the good rows of ``write_bad_dataset(path, n_good, _, seed)``, in the same order."""
    Path(path).write_bytes(b"".join(line + b"\n" for line in _good_lines(n_good, seed)))
