"""``python``: counting and number problems, a sandboxed Python tool, reward on the answer.

The model may run Python snippets (``python`` tool, what they print comes back) before it
replies with a number; the episode ends at that reply, rewarded as the calculator's is
(:func:`dist_ft.envs.calculator.final_answer`). The snippets run in the reward sandbox
(``dist_ft/rewards/sandbox.py``: bubblewrap, no network, rlimits, a private workspace, a wall
clock), so a snippet that loops, forks, reads the machine or phones home gets an error back, and
the count of snippets that failed is ``env/code_errors``.
"""

from __future__ import annotations

import random
from typing import Any

from dist_ft.envs.base import Message, Step, Tool
from dist_ft.envs.calculator import final_answer
from dist_ft.rewards.sandbox import run_python

SYSTEM = (
    "Solve the problem. You may run Python with the python tool (print what you need), then "
    "reply with the final answer as a number."
)
_OUTPUT_CHARS = 2000  # of a snippet's output shown to the model


class Python:
    def __init__(self, row: dict[str, Any], timeout_s: float = 5.0, turn_penalty: float = 0.0):
        self.question = str(row["prompt"])
        self.answer = float(row["answer"])
        self.timeout_s = timeout_s
        self.turn_penalty = turn_penalty
        self.code_errors = 0
        schema = {
            "type": "object",
            "properties": {"code": {"type": "string"}},
            "required": ["code"],
        }
        self.tools = [
            Tool("python", "Run a Python snippet; returns what it prints.", schema, self.run)
        ]

    def run(self, code: str) -> str:
        result = run_python(code, [], timeout_s=self.timeout_s)
        if result.error:
            self.code_errors += 1
            return f"{result.output[-_OUTPUT_CHARS:]}error: {result.error}"
        return result.output[-_OUTPUT_CHARS:] or "(printed nothing)"

    def reset(self) -> list[Message]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.question}]

    def step(self, message: str) -> Step:
        end = final_answer(message, self.answer, self.turn_penalty)
        end.info["code_errors"] = float(self.code_errors)
        return end


def _primes(k: int) -> list[int]:
    found: list[int] = []
    n = 2
    while len(found) < k:
        if all(n % p for p in found if p * p <= n):
            found.append(n)
        n += 1
    return found


def rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` problems that a snippet answers and a small model does not know by heart."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind, m = i % 3, rng.randint(20, 300)
        if kind == 0:
            prompt, answer = (
                f"What is the sum of the squares of 1 to {m}?",
                sum(j * j for j in range(1, m + 1)),
            )
        elif kind == 1:
            prompt = f"How many integers from 1 to {m * 10} are divisible by 3 or 7?"
            answer = sum(1 for j in range(1, m * 10 + 1) if j % 3 == 0 or j % 7 == 0)
        else:
            prompt, answer = f"What is the {m}th prime number?", _primes(m)[-1]
        out.append({"prompt": prompt, "answer": str(answer)})
    return out
