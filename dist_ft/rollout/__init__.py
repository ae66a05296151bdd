"""Rollout: the worker (generate, score, advantages, payload) and its generation engines.

``worker.py`` holds :class:`RolloutWorker`; ``base.py`` the :class:`Generator` seam; ``hf.py``
the transformers ``generate`` engine.
"""

from dist_ft.rollout.base import Generation, Generator, GeneratorKind, GeneratorSpec
from dist_ft.rollout.worker import RolloutSpec, RolloutWorker

__all__ = [
    "Generation",
    "Generator",
    "GeneratorKind",
    "GeneratorSpec",
    "RolloutSpec",
    "RolloutWorker",
]
