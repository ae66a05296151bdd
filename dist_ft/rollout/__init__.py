"""Rollout: the worker (generate, score, advantages, payload) and its generation engines.

``worker.py`` holds :class:`RolloutWorker`; ``base.py`` the :class:`Generator` seam; ``hf.py``
the transformers ``generate`` engine.
"""

from dist_ft.rollout.base import GENERATORS, Generation, Generator, GeneratorSpec
from dist_ft.rollout.worker import RolloutSpec, RolloutWorker

__all__ = [
    "GENERATORS",
    "Generation",
    "Generator",
    "GeneratorSpec",
    "RolloutSpec",
    "RolloutWorker",
]
