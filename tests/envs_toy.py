"""Environments for the episode tests, named by config as a user's would be
(``env.name=envs_toy:Relay``)."""

from __future__ import annotations

import time
from typing import Any

from dist_ft.envs import Step, Tool


class Relay:
    """Answers each model turn with a tool message ("seen 1", "seen 2", ...) and ends after
    ``turns`` model turns. Turn reward: 1 for an even-length turn; ``info["k"]`` counts turns.
    ``delay_s``: each step takes that long (an application's latency; the chaos test's window)."""

    def __init__(self, row: dict[str, Any], turns: int = 3, delay_s: float = 0.0) -> None:
        self.prompt, self.turns, self.k, self.delay_s = row["prompt"], turns, 0, delay_s

    def reset(self) -> list[dict[str, Any]]:
        return [{"role": "user", "content": self.prompt}]

    def step(self, message: str) -> Step:
        time.sleep(self.delay_s)
        self.k += 1
        seen = [{"role": "tool", "content": f"seen {self.k}"}]
        return Step(
            seen, reward=float(len(message) % 2 == 0), done=self.k >= self.turns, info={"k": 1}
        )


def _boom(x: str) -> str:
    raise ValueError(f"boom on {x}")


def _slow(x: str) -> str:
    time.sleep(5)
    return x


class Faulty:
    """Tools that work, raise and hang; ``fail`` = "reset" or "step" raises there. A reply
    without a tool call ends the episode with reward 1."""

    def __init__(self, row: dict[str, Any], fail: str = "") -> None:
        self.prompt, self.fail = row["prompt"], fail
        schema = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
        self.tools = [
            Tool("echo", "returns x", schema, lambda x: f"echo {x}"),
            Tool("boom", "raises", schema, _boom),
            Tool("slow", "hangs", schema, _slow),
        ]

    def reset(self) -> list[dict[str, Any]]:
        if self.fail == "reset":
            raise RuntimeError("reset failed")
        return [{"role": "user", "content": self.prompt}]

    def step(self, message: str) -> Step:
        if self.fail == "step":
            raise RuntimeError("step failed")
        return Step(reward=1.0, done=True)
