"""The environment seam: what a multi-turn episode asks of the application the model acts in.

An environment is built once per episode from its dataset row, ``Env(row, **env.kwargs)``, and
lives inside the rollout worker for that episode alone. ``reset()`` gives the first messages the
model sees; each ``step(message)`` takes the model's turn (its text) and gives what comes back
(tool results, a user's reply), a turn reward and whether the episode is over. The rollout worker
keeps the tokens (``rollout/episodes.py``): an environment deals in messages only, and never sees
or makes token ids, so nothing it does can re-tokenise what the policy sampled.

A user's environment is a plain class in their own module, named ``package.module:Class`` in
``env.name``, like a reward function; the built-in ones are in :data:`dist_ft.envs.ENVIRONMENTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

Message = dict[str, Any]  # a chat message: {"role": ..., "content": ...}


@dataclass
class Step:
    """What the environment answers to one model turn."""

    messages: list[Message] = field(default_factory=list)  # appended before the next turn
    reward: float = 0.0  # this turn's reward; the episode's return is the sum over its turns
    done: bool = False  # the episode is over: no more model turns (``messages`` are dropped)
    info: dict[str, Any] = field(default_factory=dict)  # numbers here are summed into metrics


@dataclass(frozen=True)
class Tool:
    """A function the model may call: ``name``, what it does, its JSON schema (the arguments'
    ``{"type": "object", "properties": ...}``) and the Python callable, called with the
    arguments as keywords and returning the text the model sees."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., str]

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema: what chat templates with tool support render."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class Environment(Protocol):
    """Built as ``Env(row, **kwargs)``: ``row`` is the episode's dataset row (every column)."""

    def reset(self) -> list[Message]:
        """The messages before the model's first turn (a system prompt, the user's request).
        The G episodes of one row must return the same ones: GRPO compares answers to one
        prompt."""
        ...

    def step(self, message: str) -> Step:
        """The model's turn (its text, special tokens removed) -> the environment's answer."""
        ...

    # Optional, not part of the protocol: ``tools`` (a list of :class:`Tool`, the model's tool
    # calls are answered with them instead of ``step``) and ``close()`` (called once when the
    # episode has ended, however it ended: free a workspace, a process, a connection).
