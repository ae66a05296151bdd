"""Prompt datasets: loading, validation, templating, and a resumable sampler.

Every row is validated and rendered before step 1, so a bad row fails the run before any compute
is spent, with an error naming the file, the row and the field.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

DEMO_LETTERS = string.ascii_lowercase[:8]
DEMO_REPEAT = 4


class DatasetError(ValueError):
    """A dataset row that cannot be used. The message names file, row and field."""


@dataclass(frozen=True)
class Prompt:
    index: int  # row index in the source: the stable id used by the sample ledger
    text: str  # rendered (template applied): what the policy sees
    answer: str | None  # reference answer for verifiers, if the dataset has one


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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open("rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}: row {i}: invalid UTF-8 ({e.reason})") from None
            if not line.strip():
                raise DatasetError(f"{path}: row {i}: empty line")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: row {i}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}: row {i}: expected a JSON object")
            rows.append(row)
    return rows


def load_rows(
    source: str, demo_size: int = 256, seed: int = 0
) -> datasets.Dataset | list[dict[str, Any]]:
    """Raw rows from ``"demo"``, a .jsonl or .parquet file, or a ``save_to_disk`` folder."""
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
        # Parsed line by line, not by pyarrow: an error can name its row, and a row of the wrong
        # type reaches validation instead of failing the whole file's schema inference.
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path))
    raise DatasetError(f"{source}: unsupported format (use .jsonl, .parquet or a folder)")


def render(tokenizer: Any, prompt: str, template: str, plain_template: str) -> str:
    if template == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return plain_template.format(prompt=prompt)


def prepare_prompts(
    rows: datasets.Dataset | list[dict[str, Any]],
    tokenizer: Any,
    *,
    source: str,
    prompt_field: str,
    answer_field: str,
    template: str,
    plain_template: str,
    max_prompt_tokens: int,
) -> list[Prompt]:
    """Validate and render every row up front; the first bad row raises :class:`DatasetError`."""
    prompts = []
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        if prompt_field not in row or row[prompt_field] is None:
            raise DatasetError(f"{where}: missing field '{prompt_field}'")
        text = row[prompt_field]
        if not isinstance(text, str):
            raise DatasetError(
                f"{where}: field '{prompt_field}': expected a string, got {type(text).__name__}"
            )
        if not text.strip():
            raise DatasetError(f"{where}: field '{prompt_field}': empty prompt")
        answer = row.get(answer_field)
        if answer is not None and not isinstance(answer, str | int | float):
            raise DatasetError(
                f"{where}: field '{answer_field}': expected a string or number, "
                f"got {type(answer).__name__}"
            )
        try:
            rendered = render(tokenizer, text, template, plain_template)
        except (KeyError, IndexError, ValueError) as e:
            raise DatasetError(f"{where}: field '{prompt_field}': template error: {e}") from None
        n_tokens = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        if n_tokens > max_prompt_tokens:
            raise DatasetError(
                f"{where}: field '{prompt_field}': {n_tokens} tokens exceeds "
                f"data.max_prompt_tokens={max_prompt_tokens}"
            )
        prompts.append(Prompt(i, rendered, None if answer is None else str(answer)))
    if not prompts:
        raise DatasetError(f"{source}: no rows")
    return prompts


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
