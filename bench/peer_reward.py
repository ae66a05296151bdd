"""The reward that bench/peer_trl.py trains both frameworks on: one scorer, two call shapes.

dist_ft loads it as ``peer_reward:char_share`` (a user reward, ``module:function``); TRL calls
``trl_char_share`` with keyword arguments and conversational completions.
"""

from __future__ import annotations

from typing import Any


def char_share(
    prompts: list[str], completions: list[str], answers: list[str | None], **_: Any
) -> list[float]:
    """Share of the answer's characters that the completion has at the same position."""
    return [
        sum(x == y for x, y in zip(c, a)) / len(a) if a else 0.0
        for c, a in zip(completions, answers)
    ]


def trl_char_share(
    prompts: list[Any], completions: list[Any], answer: list[str], **_: Any
) -> list[float]:
    """TRL's call: the dataset's ``answer`` column by name, each completion a message list."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return char_share(prompts, texts, answer)
