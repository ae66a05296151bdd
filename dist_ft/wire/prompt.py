"""A rollout's unit of work: one prompt row, rendered, with its reference answer and task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dist_ft.tasks import DEFAULT_TASK


@dataclass(frozen=True)
class Prompt:
    index: int  # row index in the source: the stable id used by the sample ledger
    text: str  # rendered (template applied): what the policy sees
    answer: str | None  # reference answer for verifiers, if the dataset has one
    task: str = DEFAULT_TASK  # the row's task column: which reward functions score it
    # env.name: the whole dataset row, which the episode's environment is built from
    row: dict[str, Any] | None = field(default=None, compare=False)
