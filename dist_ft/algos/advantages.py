"""Advantage estimators by name (``grpo.advantage``): each turns a group's rewards into its
samples' advantages. One function (pure torch, in ``algos/``) plus one line in
:data:`ADVANTAGES`; the registry holds import paths, so the config checks names without torch.

An estimator is ``fn(rewards_BG, scale=..., valid_BG=...) -> advantages_BG``: rewards [B, G]
(B groups, G slots), ``valid_BG`` [B, G] bool marks the samples whose reward exists (the others
enter no statistic and get 0), ``scale`` is ``grpo.scale_rewards``. Always finite.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

AdvantageFn = Callable[..., "torch.Tensor"]

ADVANTAGES: dict[str, str] = {
    # (r - mean) / std over the group; scale=False (Dr.GRPO) centres only
    "grpo": "dist_ft.algos.grpo:group_advantages",
}


def advantage_fn(name: str) -> AdvantageFn:
    """The registered estimator ``name`` (KeyError naming the registered ones)."""
    if name not in ADVANTAGES:
        known = ", ".join(ADVANTAGES)
        raise KeyError(f"unknown advantage estimator {name!r}; registered: {known}")
    module, _, attr = ADVANTAGES[name].partition(":")
    fn: Any = getattr(importlib.import_module(module), attr)
    return fn
