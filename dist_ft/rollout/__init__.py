"""Rollout: the worker (generate, score, advantages, payload) and its generation engines.

``worker.py`` holds :class:`RolloutWorker`; ``base.py`` the :class:`Generator` seam; ``hf.py``
the transformers ``generate`` engine; ``vllm_engine.py`` the vLLM one (``vllm_spec.py``: what
it serves, which the config checks without importing torch).

The names below load on first use: the config imports ``vllm_spec`` from here, and must not
pull in the worker's torch and transformers with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dist_ft.rollout.base import GENERATORS, Generation, Generator, GeneratorSpec
    from dist_ft.rollout.worker import RolloutSpec, RolloutWorker

_WHERE = {
    "GENERATORS": "base",
    "Generation": "base",
    "Generator": "base",
    "GeneratorSpec": "base",
    "RolloutSpec": "worker",
    "RolloutWorker": "worker",
}

__all__ = [
    "GENERATORS",
    "Generation",
    "Generator",
    "GeneratorSpec",
    "RolloutSpec",
    "RolloutWorker",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
