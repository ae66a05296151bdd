"""Prompt datasets: loading, validation, templating, and a resumable sampler.

Every row is validated and rendered before step 1. With ``on_bad_row="error"`` the first bad row in
file order fails the run before any compute is spent, with an error naming the file, the row and
the field; with ``"skip"`` every bad row becomes a :class:`Reject` (see :func:`write_rejects`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import torch

# Eight letters that the instruction "Repeat" does not contain. With a..h, RL runs kept
# collapsing prompts onto "a": copying the "a" of "Repeat" (a fixed position) is a shortcut that
# pays on the "a" prompts, and a prompt whose G samples are all wrong has zero advantage, so it
# never escapes. Without a distractor in the instruction, the only paying copy is the right one.
DEMO_LETTERS = "bcdfghjk"
DEMO_REPEAT = 4


class DatasetError(ValueError):
    """A dataset row that cannot be used. The message names file, row and field."""


@dataclass(frozen=True)
class Prompt:
    index: int  # row index in the source: the stable id used by the sample ledger
    text: str  # rendered (template applied): what the policy sees
    answer: str | None  # reference answer for verifiers, if the dataset has one


@dataclass(frozen=True)
class BadLine:
    """A jsonl line that is not a JSON object. It keeps its place among the rows, so validation
    reports problems in file order and row indices stay line numbers (0-based)."""

    reason: str
    raw: str  # the line, invalid UTF-8 replaced by U+FFFD


@dataclass(frozen=True)
class Reject:
    """A row that ``on_bad_row="skip"`` left out; one line of rejects.jsonl."""

    source: str
    row: int  # 0-based row index in the source (for jsonl: the line)
    field: str | None  # None when the line did not decode to a JSON object
    reason: str
    raw: str  # the line as text, or the row re-serialised as JSON

    def __str__(self) -> str:
        field = "" if self.field is None else f"field '{self.field}': "
        return f"{self.source}: row {self.row}: {field}{self.reason}"


@dataclass(frozen=True)
class PreparedPrompts:
    prompts: list[Prompt]  # good rows, in source order
    rejects: list[Reject]  # empty unless on_bad_row="skip"


class _BadRow(Exception):
    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


Rows = datasets.Dataset | Sequence[dict[str, Any] | BadLine]


def demo_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """The built-in task: "Repeat c:" -> "cccc". Verifiable by string comparison, and learnable
    by a random-init tiny model within a minute of CPU time."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        c = rng.choice(DEMO_LETTERS)
        rows.append({"prompt": f"Repeat {c}:", "answer": c * DEMO_REPEAT})
    return rows


def demo_format_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Format-only warm-up targets for the demo task: four copies of a *random* demo letter.

    They teach the shape of an answer (four identical letters) without the task itself (which
    letter): the policy leaves warm-up scoring about 1/8 and RL has to learn the rest.
    """
    rng = random.Random(seed + 1)
    return [
        {"prompt": row["prompt"], "completion": rng.choice(DEMO_LETTERS) * DEMO_REPEAT}
        for row in demo_rows(n, seed)
    ]


def _parse_line(raw: bytes) -> dict[str, Any] | BadLine:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        return BadLine(f"invalid UTF-8 ({e.reason} at byte {e.start})", text)
    text = line.rstrip("\r\n")
    if not line.strip():
        return BadLine("empty line", text)
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return BadLine(f"invalid JSON ({e.msg} at column {e.colno})", text)
    if not isinstance(row, dict):
        return BadLine(f"expected a JSON object, got {type(row).__name__}", text)
    return row


def _read_jsonl(path: Path) -> list[dict[str, Any] | BadLine]:
    with path.open("rb") as f:
        return [_parse_line(raw) for raw in f]


def load_rows(source: str, demo_size: int = 256, seed: int = 0) -> Rows:
    """Raw rows from ``"demo"``, a .jsonl or .parquet file, or a ``save_to_disk`` folder.

    A jsonl line that is not a JSON object comes back as a :class:`BadLine` in its place; it is
    :func:`prepare_prompts` that raises or skips it, like any other bad row.
    """
    if source == "demo":
        return demo_rows(demo_size, seed)
    path = Path(source)
    if not path.exists():
        raise DatasetError(f"data.source not found: {source}")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise DatasetError(f"{source}: holds splits {list(loaded)}; point at one split")
        return loaded
    if path.suffix == ".jsonl":
        # Parsed line by line, not by pyarrow: an error can name its row, one bad line can be
        # skipped, and a row of the wrong type reaches validation instead of failing the whole
        # file's schema inference.
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path))
    raise DatasetError(f"{source}: unsupported format (use .jsonl, .parquet or a folder)")


def render(tokenizer: Any, prompt: str, template: str, plain_template: str) -> str:
    """The prompt as the policy sees it. Raises ValueError, KeyError or IndexError when the
    template cannot render it."""
    if template == "chat":
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2

        try:
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        except TemplateError as e:  # e.g. a template's raise_exception(...)
            raise ValueError(e.message or type(e).__name__) from e
    return plain_template.format(prompt=prompt)


def _prompt_from_row(
    index: int,
    row: dict[str, Any] | BadLine,
    tokenizer: Any,
    prompt_field: str,
    answer_field: str,
    template: str,
    plain_template: str,
    max_prompt_tokens: int,
) -> Prompt:
    if isinstance(row, BadLine):
        raise _BadRow(None, row.reason)
    if prompt_field not in row or row[prompt_field] is None:
        raise _BadRow(prompt_field, "missing")
    text = row[prompt_field]
    if not isinstance(text, str):
        raise _BadRow(prompt_field, f"expected a string, got {type(text).__name__}")
    if not text.strip():
        raise _BadRow(prompt_field, "empty prompt")
    answer = row.get(answer_field)
    if answer is not None and not isinstance(answer, str | int | float):
        raise _BadRow(answer_field, f"expected a string or number, got {type(answer).__name__}")
    # JSON's "\ud800" escape decodes to a lone surrogate, which the tokenizer cannot encode.
    for name, value in ((prompt_field, text), (answer_field, answer)):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise _BadRow(name, f"lone surrogate at character {e.start}") from None
    try:
        rendered = render(tokenizer, text, template, plain_template)
    except (KeyError, IndexError, ValueError) as e:
        raise _BadRow(prompt_field, f"template error: {e}") from None
    n_tokens = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    if n_tokens > max_prompt_tokens:
        raise _BadRow(
            prompt_field,
            f"{n_tokens} tokens exceeds data.max_prompt_tokens={max_prompt_tokens}",
        )
    return Prompt(index, rendered, None if answer is None else str(answer))


def _raw_text(row: dict[str, Any] | BadLine) -> str:
    if isinstance(row, BadLine):
        return row.raw
    return json.dumps(row, ensure_ascii=False, default=str)


def prepare_prompts(
    rows: Rows,
    tokenizer: Any,
    *,
    source: str,
    prompt_field: str,
    answer_field: str,
    template: str,
    plain_template: str,
    max_prompt_tokens: int,
    on_bad_row: Literal["error", "skip"] = "error",
) -> PreparedPrompts:
    """Validate and render every row up front, in source order.

    ``on_bad_row="error"``: the first bad row raises :class:`DatasetError`. ``"skip"``: bad rows
    become :class:`Reject` records and the rest become prompts. Either way, no usable row at all
    raises. ``Prompt.index`` is the row's index in the source, bad rows included.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    prompts: list[Prompt] = []
    rejects: list[Reject] = []
    for i, row in enumerate(rows):
        try:
            prompts.append(
                _prompt_from_row(
                    i,
                    row,
                    tokenizer,
                    prompt_field,
                    answer_field,
                    template,
                    plain_template,
                    max_prompt_tokens,
                )
            )
        except _BadRow as e:
            reject = Reject(source, i, e.field, e.reason, _raw_text(row))
            if on_bad_row == "error":
                raise DatasetError(str(reject)) from None
            rejects.append(reject)
    if not prompts:
        if not rejects:
            raise DatasetError(f"{source}: no usable rows (the source is empty)")
        raise DatasetError(
            f"{source}: no usable rows ({len(rejects)} rejected; first: {rejects[0]})"
        )
    return PreparedPrompts(prompts, rejects)


def write_rejects(path: str | Path, rejects: Iterable[Reject]) -> None:
    """One JSON object per reject (keys: source, row, field, reason, raw). ASCII-escaped, since a
    lone surrogate in ``raw`` has no UTF-8 encoding."""
    with Path(path).open("w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(asdict(r)) + "\n")


def encode_pairs(
    tokenizer: Any, prompts: list[str], targets: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Supervised pairs as tensors: prompts left-padded [N, P], targets + EOS right-padded
    [N, T], each with its 0/1 mask."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    target_ids = [
        tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for t in targets
    ]
    width = max(len(t) for t in target_ids)
    ids = torch.full((len(targets), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(targets), width), dtype=torch.long)
    for i, t in enumerate(target_ids):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    return enc["input_ids"], enc["attention_mask"], ids, mask


class PromptSampler:
    """Shuffled epochs over prompt indices, with a cursor that a checkpoint can restore.

    Each epoch's order is a function of (seed, epoch) alone, so resuming from (epoch, cursor)
    replays nothing and skips nothing.
    """

    def __init__(self, num_prompts: int, seed: int) -> None:
        self.num_prompts = num_prompts
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_prompts, generator=g).tolist()

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.cursor == self.num_prompts:
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
            out.append(self._order[self.cursor])
            self.cursor += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)
