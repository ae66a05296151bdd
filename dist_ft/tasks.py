"""The built-in tasks: letter puzzles that a random-init tiny model learns within minutes of CPU.

Each is verifiable by string comparison with its answer. The sources (``data.source``):
``demo`` is "Repeat c:" -> "cccc", ``demo_next`` is "Next c:" -> "dddd" (the letter after c in
:data:`DEMO_LETTERS`, cyclic), and ``demo_mix`` deals the two in turn, each row with a ``task``
column ("repeat" or "next"): one adapter trained on both (README, "Multi-task").
"""

from __future__ import annotations

import random
from collections.abc import Callable

# Eight letters that neither instruction ("Repeat", "Next") contains. With a..h, RL runs kept
# collapsing prompts onto "a": copying the "a" of "Repeat" (a fixed position) is a shortcut that
# pays on the "a" prompts, and a prompt whose G samples are all wrong has zero advantage, so it
# never escapes. Without a distractor in the instruction, the only paying copy is the right one.
DEMO_LETTERS = "bcdfghjk"
DEMO_REPEAT = 4
DEFAULT_TASK = "default"  # the task of a row without a task column

# task -> (instruction, the letter its answer repeats, given the prompt's letter)
TASKS: dict[str, tuple[str, Callable[[str], str]]] = {
    "repeat": ("Repeat", lambda c: c),
    "next": ("Next", lambda c: DEMO_LETTERS[(DEMO_LETTERS.index(c) + 1) % len(DEMO_LETTERS)]),
}
# data.source -> the tasks its rows deal in turn. Single-task sources have no task column, so
# their rows are task "default", as a user's file without one.
SOURCES: dict[str, tuple[str, ...]] = {
    "demo": ("repeat",),
    "demo_next": ("next",),
    "demo_mix": ("repeat", "next"),
}


def demo_rows(n: int, seed: int = 0, source: str = "demo") -> list[dict[str, str]]:
    """``n`` rows of a built-in source: ``{"prompt", "answer"}``, and ``"task"`` in a mix."""
    tasks = SOURCES[source]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        instruction, letter = TASKS[task]
        c = rng.choice(DEMO_LETTERS)
        row = {"prompt": f"{instruction} {c}:", "answer": letter(c) * DEMO_REPEAT}
        rows.append({**row, "task": task} if len(tasks) > 1 else row)
    return rows


def demo_format_rows(n: int, seed: int = 0, source: str = "demo") -> list[dict[str, str]]:
    """Format-only warm-up targets for a built-in source: four copies of a *random* letter.

    They teach the shape of an answer (four identical letters) without the task itself (which
    letter): the policy leaves warm-up scoring about 1/8 and RL has to learn the rest.
    """
    rng = random.Random(seed + 1)
    return [
        {
            "prompt": row["prompt"],
            "completion": rng.choice(DEMO_LETTERS) * DEMO_REPEAT,
            "task": row.get("task", DEFAULT_TASK),
        }
        for row in demo_rows(n, seed, source)
    ]
