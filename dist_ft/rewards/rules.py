"""Built-in rule verifiers. Each scores a batch: ``fn(prompts, completions, answers, **kw)``
returns one float per completion."""

from __future__ import annotations

import re


def normalise(text: str) -> str:
    """Case-folded, whitespace-collapsed, without trailing full stops: "  Paris. " == "paris"."""
    return " ".join(text.strip().lower().split()).rstrip(".").strip()


def exact_match(
    prompts: list[str], completions: list[str], answers: list[str | None]
) -> list[float]:
    """1.0 when the normalised completion equals the normalised answer."""
    return [
        float(a is not None and normalise(c) == normalise(a)) for c, a in zip(completions, answers)
    ]


def char_match(
    prompts: list[str], completions: list[str], answers: list[str | None]
) -> list[float]:
    """Share of the answer's characters that the completion has at the same position.

    Partial credit gives a dense signal where exact match is almost never hit at first.
    """
    out = []
    for c, a in zip(completions, answers):
        if not a:
            out.append(0.0)
            continue
        out.append(sum(x == y for x, y in zip(c, a)) / len(a))
    return out


def format_regex(
    prompts: list[str], completions: list[str], answers: list[str | None], pattern: str
) -> list[float]:
    """1.0 when the whole (stripped) completion matches ``pattern``."""
    rx = re.compile(pattern, re.DOTALL)
    return [float(rx.fullmatch(c.strip()) is not None) for c in completions]


def length_penalty(
    prompts: list[str], completions: list[str], answers: list[str | None], max_chars: int
) -> list[float]:
    """0 up to ``max_chars``, then falling linearly to -1 at twice that length."""
    return [-min(1.0, max(0, len(c) - max_chars) / max_chars) for c in completions]
