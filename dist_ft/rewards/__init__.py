"""Reward functions: built-in verifiers, ``module:function`` user rewards, weighted sums."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from dist_ft.rewards import rules


class RewardFn(Protocol):
    def __call__(
        self, prompts: list[str], completions: list[str], answers: list[str | None], **kw: Any
    ) -> list[float]: ...


BUILTIN: dict[str, Callable[..., list[float]]] = {
    "exact_match": rules.exact_match,
    "char_match": rules.char_match,
    "format_regex": rules.format_regex,
    "length_penalty": rules.length_penalty,
}


class RewardError(RuntimeError):
    """A reward function failed; the message names it."""


def resolve(name: str) -> Callable[..., list[float]]:
    """A built-in verifier by name, or a user function given as ``package.module:function``."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise RewardError(
            f"unknown reward '{name}': use one of {sorted(BUILTIN)} or 'package.module:function'"
        )
    module_name, fn_name = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"cannot load reward '{name}': {e}") from None
    if not callable(fn):
        raise RewardError(f"reward '{name}' is not callable")
    return fn


class RewardSet:
    """A weighted sum of reward functions; each function's raw score is kept for logging."""

    def __init__(self, specs: list[tuple[str, float, dict[str, Any]]]) -> None:
        if not specs:
            raise RewardError("no reward functions configured (reward.functions is empty)")
        self.names = [name for name, _, _ in specs]
        self.weights = torch.tensor([w for _, w, _ in specs], dtype=torch.float32)
        self._fns = [(resolve(name), kwargs) for name, _, kwargs in specs]

    def score(
        self, prompts: list[str], completions: list[str], answers: list[str | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns per-function rewards [N, K] and their weighted sum [N]."""
        columns = []
        for name, (fn, kwargs) in zip(self.names, self._fns):
            try:
                values = list(fn(prompts, completions, answers, **kwargs))
            except Exception as e:  # a user function may raise anything; name it, keep cause
                raise RewardError(f"reward '{name}' raised {type(e).__name__}: {e}") from e
            if len(values) != len(completions):
                raise RewardError(
                    f"reward '{name}' returned {len(values)} scores for {len(completions)} samples"
                )
            bad = [v for v in values if not isinstance(v, int | float) or not math.isfinite(v)]
            if bad:
                raise RewardError(f"reward '{name}' returned non-finite or non-numeric {bad[:3]}")
            columns.append(torch.tensor(values, dtype=torch.float32))
        rewards_NK = torch.stack(columns, dim=1)
        return rewards_NK, rewards_NK @ self.weights
