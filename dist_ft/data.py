"""Datasets: RL prompts, SFT demonstrations and preference pairs (loading, validation,
templating, tokenizing), and a resumable prompt sampler.

Every row is validated and rendered before step 1. With ``on_bad_row="error"`` the first bad row in
file order fails the run before any compute is spent, with an error naming the file, the row and
the field; with ``"skip"`` every bad row becomes a :class:`Reject` (see :func:`write_rejects`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar

import datasets
import torch

from dist_ft.envs import EnvError, is_env_source, source_rows
from dist_ft.tasks import DEFAULT_TASK, SOURCES, demo_rows
from dist_ft.wire.batch import Span
from dist_ft.wire.prompt import Prompt


class DatasetError(ValueError):
    """A dataset row that cannot be used. The message names file, row and field."""


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
    """A row that cannot be used. ``fatal``: the setup is at fault, not the row (e.g. no chat
    template), so skipping would reject every such row: it raises even under ``"skip"``."""

    def __init__(self, field: str | None, reason: str, fatal: bool = False) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason
        self.fatal = fatal


Rows: TypeAlias = datasets.Dataset | Sequence[dict[str, Any] | BadLine]
_T = TypeVar("_T")


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
    """Raw rows from a built-in source (``tasks.SOURCES``), a .jsonl or .parquet file, or a
    ``save_to_disk`` folder.

    A jsonl line that is not a JSON object comes back as a :class:`BadLine` in its place; it is
    :func:`prepare_prompts` that raises or skips it, like any other bad row.
    """
    if source in SOURCES:
        return demo_rows(demo_size, seed, source)
    if is_env_source(source):  # an environment's problems, demo_size of them
        try:
            return source_rows(source, demo_size, seed)
        except EnvError as e:  # a library not installed, a task it does not have
            raise DatasetError(str(e)) from None
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


def prompt_row(rows: Rows, index: int) -> dict[str, Any]:
    """The row of :func:`load_rows` that prepared prompt ``index`` came from."""
    row = rows[index]
    assert not isinstance(row, BadLine)  # a bad line is rejected, it never becomes a prompt
    return row


def _chat_text(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    """``messages`` through the tokenizer's chat template, as text. A template's own failure
    (e.g. its ``raise_exception(...)``) comes out as ValueError."""
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False
        )
    except TemplateError as e:
        raise ValueError(e.message or type(e).__name__) from e


def render(tokenizer: Any, prompt: str, template: str, plain_template: str) -> str:
    """The prompt as the policy sees it. Raises ValueError, KeyError or IndexError when the
    template cannot render it."""
    if template == "chat":
        return _chat_text(tokenizer, [{"role": "user", "content": prompt}], True)
    return plain_template.format(prompt=prompt)


def _require_text(row: dict[str, Any], field: str, what: str) -> str:
    """``row[field]`` as a non-blank str, else a :class:`_BadRow` naming ``field``."""
    if row.get(field) is None:
        raise _BadRow(field, "missing")
    text = row[field]
    if not isinstance(text, str):
        raise _BadRow(field, f"expected a string, got {type(text).__name__}")
    if not text.strip():
        raise _BadRow(field, f"empty {what}")
    return text


def _check_encodable(field: str, value: Any) -> None:
    # JSON's "\ud800" escape decodes to a lone surrogate, which the tokenizer cannot encode.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _BadRow(field, f"lone surrogate at character {e.start}") from None


def _render_prompt(
    tokenizer: Any, field: str, text: str, template: str, plain_template: str
) -> str:
    try:
        return render(tokenizer, text, template, plain_template)
    except (KeyError, IndexError, ValueError) as e:
        raise _BadRow(field, f"template error: {e}") from None


def _encode(tokenizer: Any, text: str) -> list[int]:
    # No special tokens: the template (plain or chat) decides what surrounds the text, exactly
    # as for the prompts the policy is sampled on.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _raw_text(row: dict[str, Any] | BadLine) -> str:
    if isinstance(row, BadLine):
        return row.raw
    return json.dumps(row, ensure_ascii=False, default=str)


def _validate_rows(
    rows: Rows,
    source: str,
    on_bad_row: Literal["error", "skip"],
    build: Callable[[int, dict[str, Any]], _T],
) -> tuple[list[_T], list[Reject]]:
    """``build(index, row)`` on every row in source order: the one validation loop of every loader.

    A :class:`_BadRow` raises :class:`DatasetError` (``"error"``, or a fatal one) or becomes a
    :class:`Reject` (``"skip"``). No usable row at all raises either way.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    good: list[_T] = []
    rejects: list[Reject] = []
    for i, row in enumerate(rows):
        try:
            if isinstance(row, BadLine):
                raise _BadRow(None, row.reason)
            good.append(build(i, row))
        except _BadRow as e:
            reject = Reject(source, i, e.field, e.reason, _raw_text(row))
            if on_bad_row == "error" or e.fatal:
                raise DatasetError(str(reject)) from None
            rejects.append(reject)
    if not good:
        if not rejects:
            raise DatasetError(f"{source}: no usable rows (the source is empty)")
        raise DatasetError(
            f"{source}: no usable rows ({len(rejects)} rejected; first: {rejects[0]})"
        )
    return good, rejects


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
    task_field: str = "task",
    keep_rows: bool = False,
) -> PreparedPrompts:
    """Validate and render every row up front, in source order.

    ``on_bad_row="error"``: the first bad row raises :class:`DatasetError`. ``"skip"``: bad rows
    become :class:`Reject` records and the rest become prompts. Either way, no usable row at all
    raises. ``Prompt.index`` is the row's index in the source, bad rows included. A row without
    ``task_field`` is task ``"default"``. ``keep_rows``: each Prompt carries its whole row
    (``env.name``: the episode's environment is built from it).
    """

    def build(index: int, row: dict[str, Any]) -> Prompt:
        if template == "chat" and isinstance(row.get(prompt_field), list):  # chat messages
            messages = _messages(row, prompt_field)
            try:
                rendered = _chat_text(tokenizer, messages, generation_prompt=True)
            except (KeyError, IndexError, ValueError) as e:
                raise _BadRow(prompt_field, f"template error: {e}") from None
        else:
            text = _require_text(row, prompt_field, "prompt")
            _check_encodable(prompt_field, text)
            rendered = _render_prompt(tokenizer, prompt_field, text, template, plain_template)
        answer = row.get(answer_field)
        if answer is not None and not isinstance(answer, str | int | float):
            kind = type(answer).__name__
            raise _BadRow(answer_field, f"expected a string or number, got {kind}")
        _check_encodable(answer_field, answer)
        n_tokens = len(_encode(tokenizer, rendered))
        if n_tokens > max_prompt_tokens:
            raise _BadRow(
                prompt_field,
                f"{n_tokens} tokens exceeds data.max_prompt_tokens={max_prompt_tokens}",
            )
        task = DEFAULT_TASK if row.get(task_field) is None else _text(row, task_field)
        answer = None if answer is None else str(answer)
        return Prompt(index, rendered, answer, task, dict(row) if keep_rows else None)

    prompts, rejects = _validate_rows(rows, source, on_bad_row, build)
    return PreparedPrompts(prompts, rejects)


@dataclass(frozen=True)
class Example:
    """One tokenized training sequence (an SFT row, or one side of a preference pair). No
    prompt/completion split, only ids and which of them are trained, so multi-turn fits as is."""

    index: int  # row index in the source, bad rows included (as Prompt.index)
    ids: torch.Tensor  # [L] int32 token ids, the rendered sequence in order
    spans: torch.Tensor  # [L] int8 Span codes: CONTEXT (prompt, non-assistant turns) or TRAINED
    truncated: bool  # cut to max_length


@dataclass(frozen=True)
class PreparedSFT:
    examples: list[Example]  # good rows, in source order
    rejects: list[Reject]  # empty unless on_bad_row="skip"
    num_truncated: int  # examples cut to max_length: a metric, high when max_length is too low


@dataclass(frozen=True)
class PreferencePair:
    """Two whole sequences that start with the same prompt tokens (CONTEXT), then differ
    (TRAINED). A DPO step batches B pairs as the 2B examples ``chosen... + rejected...``, padded
    (``packing.pad_examples``, [2B, T]) or packed (``packing.pack_examples``), and reads both
    sides' sequence logprobs off one [2B] vector (``packing.example_sums``): one forward."""

    index: int  # row index in the source; chosen.index == rejected.index == index
    chosen: Example
    rejected: Example


@dataclass(frozen=True)
class PreparedPairs:
    pairs: list[PreferencePair]
    rejects: list[Reject]
    num_truncated: int  # pairs with either side cut to max_length


def _text(row: dict[str, Any], field: str) -> str:
    text = _require_text(row, field, field)
    _check_encodable(field, text)
    return text


# The roles of the chat format that HF chat templates and TRL share. Any other role would be
# rendered by some templates as a user turn and dropped or refused by others, and is never
# trained (only assistant turns are): a typo ("asistant") would silently lose a demonstration.
ROLES = ("system", "user", "assistant", "tool")


def _messages(row: dict[str, Any], field: str) -> list[dict[str, Any]]:
    """``row[field]`` as a non-empty list of ``{"role": str, "content": str}``, each role one of
    :data:`ROLES` (other keys, e.g. ``name``, go to the template as they are)."""
    value = row.get(field)
    if value is None:
        raise _BadRow(field, "missing")
    if not isinstance(value, list):
        raise _BadRow(field, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise _BadRow(field, "empty conversation")
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise _BadRow(f"{field}[{j}]", f"expected a message object, got {type(m).__name__}")
        for key in ("role", "content"):
            name = f"{field}[{j}].{key}"
            if m.get(key) is None:
                raise _BadRow(name, "missing")
            if not isinstance(m[key], str):
                raise _BadRow(name, f"expected a string, got {type(m[key]).__name__}")
            _check_encodable(name, m[key])
        if m["role"] not in ROLES:
            raise _BadRow(
                f"{field}[{j}].role", f"unknown role {m['role']!r} (allowed: {', '.join(ROLES)})"
            )
    return value


def _chat_tokens(
    tokenizer: Any, messages: list[dict[str, Any]], field: str, train_from: int
) -> tuple[list[int], list[Span]]:
    """The conversation's ids, its assistant turns from message ``train_from`` on TRAINED.

    A turn is located by rendering the messages before it (with the generation prompt) and
    through it, and diffing token counts: no ``{% generation %}`` markers needed, and a template
    that rewrites earlier turns (e.g. drops their reasoning) fails the prefix check instead of
    being mis-masked. A turn trains on its content and the template's end-of-turn tokens; no
    EOS is appended (the template decides how a turn ends).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        reason = "the tokenizer has no chat template; set one, or use prompt/completion rows"
        raise _BadRow(field, reason, fatal=True)

    def encode(upto: int, generation_prompt: bool) -> list[int]:
        try:
            return _encode(tokenizer, _chat_text(tokenizer, messages[:upto], generation_prompt))
        except (KeyError, IndexError, ValueError) as e:
            raise _BadRow(field, f"template error: {e}") from None

    ids = encode(len(messages), False)
    spans = [Span.CONTEXT] * len(ids)
    for i in range(train_from, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before, through = encode(i, True), encode(i + 1, False)
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise _BadRow(
                field,
                f"the chat template renders the turns up to message {i} differently from the "
                "start of the whole conversation, so that turn's tokens cannot be located",
            )
        spans[len(before) : len(through)] = [Span.TRAINED] * (len(through) - len(before))
    return ids, spans


def _completion_tokens(
    tokenizer: Any, context: list[int], completion: str, field: str
) -> tuple[list[int], list[Span]]:
    """``context`` then the completion + EOS, TRAINED: EOS teaches the policy to stop, and the
    rollout's completions end with it."""
    if tokenizer.eos_token_id is None:
        raise _BadRow(field, "the tokenizer has no EOS token to end a completion", fatal=True)
    trained = [*_encode(tokenizer, completion), tokenizer.eos_token_id]
    return context + trained, [Span.CONTEXT] * len(context) + [Span.TRAINED] * len(trained)


def _context(tokenizer: Any, row: dict[str, Any], template: str, plain_template: str) -> list[int]:
    rendered = _render_prompt(tokenizer, "prompt", _text(row, "prompt"), template, plain_template)
    return _encode(tokenizer, rendered)


def _example(
    index: int, ids: list[int], spans: list[Span], max_length: int | None, field: str
) -> Example:
    """Cut to ``max_length`` from the right: the prompt survives, the end of the answer goes."""
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (context + a trained token): {max_length}")
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, spans = ids[:max_length], spans[:max_length]
    if Span.TRAINED not in spans:
        raise _BadRow(field, f"no trained tokens in the first {len(ids)} (max_length={max_length})")
    if spans[0] == Span.TRAINED:  # a causal LM scores a token from the ones before it
        raise _BadRow(field, "the first token is trained: no context token predicts it")
    spans_L = torch.tensor([int(s) for s in spans], dtype=torch.int8)
    return Example(index, torch.tensor(ids, dtype=torch.int32), spans_L, truncated)


def prepare_sft(
    rows: Rows,
    tokenizer: Any,
    *,
    source: str,
    template: str,
    plain_template: str,
    max_length: int | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
) -> PreparedSFT:
    """Demonstrations, validated and tokenized up front like :func:`prepare_prompts`.

    A row is ``{"prompt": str, "completion": str}``: the prompt, rendered by ``template`` /
    ``plain_template`` as for RL, is CONTEXT; the completion and an EOS are TRAINED. Or it is
    ``{"messages": [{"role", "content"}, ...]}`` through the tokenizer's chat template: the
    assistant turns are TRAINED, the rest CONTEXT. Other columns are ignored. An example over
    ``max_length`` tokens is cut (counted in ``num_truncated``); one left with no trained token
    is a bad row.
    """

    def build(i: int, row: dict[str, Any]) -> Example:
        if row.get("messages") is None:
            context = _context(tokenizer, row, template, plain_template)
            ids, spans = _completion_tokens(tokenizer, context, _text(row, "completion"), "prompt")
            return _example(i, ids, spans, max_length, "prompt")
        if row.get("prompt") is not None:
            raise _BadRow("messages", "a row has either messages or prompt/completion, not both")
        messages = _messages(row, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise _BadRow("messages", "no assistant turn to train on")
        ids, spans = _chat_tokens(tokenizer, messages, "messages", train_from=0)
        return _example(i, ids, spans, max_length, "messages")

    examples, rejects = _validate_rows(rows, source, on_bad_row, build)
    return PreparedSFT(examples, rejects, sum(e.truncated for e in examples))


def prepare_preferences(
    rows: Rows,
    tokenizer: Any,
    *,
    source: str,
    template: str,
    plain_template: str,
    max_length: int | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
) -> PreparedPairs:
    """Preference pairs, validated and tokenized up front like :func:`prepare_prompts`.

    Text form: ``{"prompt": str, "chosen": str, "rejected": str}``, each answer a completion as
    in :func:`prepare_sft`. Chat form: ``chosen`` and ``rejected`` are message lists, after an
    optional ``prompt`` message list; the leading messages they share are CONTEXT, the assistant
    turns after them TRAINED. A string ``prompt`` with message-list answers is a bad row, as it
    is ambiguous whether it is already their first turn (drop that column when the lists hold
    whole conversations). Other columns (e.g. ``margin``) are ignored. ``num_truncated`` counts
    pairs with either side cut to ``max_length``.
    """
    sides = ("chosen", "rejected")

    def build(i: int, row: dict[str, Any]) -> PreferencePair:
        chosen: str | list[dict[str, Any]]  # text, or messages in the chat form
        rejected: str | list[dict[str, Any]]
        if any(isinstance(row.get(f), list) for f in sides):
            # the answers first: an answer that is not a message list is at fault, not the prompt
            answers = [_messages(row, f) for f in sides]
            if isinstance(row.get("prompt"), str):
                raise _BadRow("prompt", "expected a message list, as chosen/rejected are")
            prompt = [] if row.get("prompt") is None else _messages(row, "prompt")
            chosen, rejected = (prompt + a for a in answers)
        else:
            context = _context(tokenizer, row, template, plain_template)
            chosen, rejected = (_text(row, f) for f in sides)
        if chosen == rejected:
            raise _BadRow("rejected", "identical to chosen: the pair states no preference")
        if isinstance(chosen, str):
            tokens = [_completion_tokens(tokenizer, context, row[f], f) for f in sides]
        else:
            # The messages both sides start with are the prompt: context, never trained.
            assert not isinstance(rejected, str)  # the chat form: both sides are message lists
            shared = next(
                (j for j, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                min(len(chosen), len(rejected)),
            )
            tokens = []
            for f, messages in zip(sides, (chosen, rejected)):
                if not any(m["role"] == "assistant" for m in messages[shared:]):
                    raise _BadRow(f, "no assistant turn after the messages both sides share")
                tokens.append(_chat_tokens(tokenizer, messages, f, train_from=shared))
        return PreferencePair(i, *(_example(i, *t, max_length, f) for f, t in zip(sides, tokens)))

    pairs, rejects = _validate_rows(rows, source, on_bad_row, build)
    truncated = sum(p.chosen.truncated or p.rejected.truncated for p in pairs)
    return PreparedPairs(pairs, rejects, truncated)


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
        out: list[int] = []
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
