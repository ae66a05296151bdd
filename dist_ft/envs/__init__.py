"""Multi-turn environments: the protocol (``base.py``), tool calls (``tools.py``), the token
rule (``chat.py``) and the built-in environments. The episode loop that drives them is
``dist_ft/rollout/episodes.py``, inside the rollout worker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dist_ft.envs.base import Environment, Message, Step, Tool
from dist_ft.extensions import import_named

__all__ = ["ENVIRONMENTS", "ENV_SOURCES", "EnvError", "Environment", "Message", "Step", "Tool"]

# env.name -> "module:Class": the built-in environments; a user's is "package.module:Class"
ENVIRONMENTS: dict[str, str] = {
    "calculator": "dist_ft.envs.calculator:Calculator",
    "python": "dist_ft.envs.python:Python",
    "code_editor": "dist_ft.envs.code_editor:CodeEditor",
    # other libraries' environments, unchanged (pip install 'dist_ft[envs]')
    "reasoning_gym": "dist_ft.envs.rgym:ReasoningGym",
    "skyrl_gym": "dist_ft.envs.skyrl:SkyRLGym",
}
# data.source -> "module:function(n, seed) -> rows": each built-in environment's own problems;
# "name/arg" calls function(n, seed, arg) (reasoning_gym/leg_counting: that task's generator)
ENV_SOURCES: dict[str, str] = {
    "calculator": "dist_ft.envs.calculator:rows",
    "python": "dist_ft.envs.python:rows",
    "code_editor": "dist_ft.envs.code_editor:rows",
    "reasoning_gym": "dist_ft.envs.rgym:rows",
}


class EnvError(ValueError):
    """``env.name`` names no usable environment; the message says which and what to fix."""


def _load(target: str, key: str, form: str) -> Any:
    found = import_named(target, key, EnvError, ENVIRONMENTS, form)
    if found is None:
        module_name, _, attr = target.partition(":")
        raise EnvError(f"{key}={target}: {module_name} has no {attr}")
    return found


def resolve_env(name: str) -> type:
    """The environment class ``env.name`` names: a built-in, or a user's
    ``package.module:Class`` with ``reset`` and ``step``. Cheap: the CLI checks it before any
    model loads."""
    cls = _load(ENVIRONMENTS.get(name, name), "env.name", "package.module:Class")
    if not isinstance(cls, type):
        raise EnvError(f"env.name={name}: {cls!r} is not a class")
    if missing := [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]:
        raise EnvError(
            f"env.name={name}: {cls.__name__} is not a dist_ft.envs.Environment: it has no "
            f"{', '.join(missing)}"
        )
    return cls


def is_env_source(source: str) -> bool:
    """Whether ``data.source`` names an environment's problems (``ENV_SOURCES``)."""
    return source.partition("/")[0] in ENV_SOURCES and not source.endswith((".jsonl", ".parquet"))


def source_rows(source: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` rows of an environment's ``data.source`` (``ENV_SOURCES``; ``name/arg`` passes
    ``arg`` on)."""
    name, _, arg = source.partition("/")
    rows: Callable[..., list[dict[str, Any]]] = _load(ENV_SOURCES[name], "data.source", "a file")
    try:
        return rows(n, seed, arg) if arg else rows(n, seed)
    except (ImportError, ValueError) as e:  # a missing library, an unknown task
        raise EnvError(f"data.source={source}: {e}") from None
