"""``calculator``: arithmetic word problems, a calculator tool, reward on the final answer.

The model may call ``calculator`` with an expression as often as it likes (within
``env.max_turns``); its first reply without a tool call is its answer, and the episode ends
there with reward 1 when the reply's last number is the row's answer, else 0 (less
``turn_penalty`` per model turn, if set). The problems (``data.source: calculator``) take two-
and three-digit products, which a 135M model gets wrong by heart and right with the tool.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from collections.abc import Callable
from typing import Any

from dist_ft.envs.base import Message, Step, Tool
from dist_ft.envs.tools import CLOSE, OPEN, with_instructions

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_OPS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
SYSTEM = (
    "Solve the problem. Use the calculator tool for the arithmetic, then reply with the final "
    "answer as a number."
)


def evaluate(expression: str) -> str:
    """``expression``'s value as the tool's answer, or what was wrong with it: + - * / // %
    and parentheses on numbers, nothing else (no names, no calls, no powers)."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)  # type: ignore[arg-type]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))  # type: ignore[no-any-return]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))  # type: ignore[no-any-return]
        raise ValueError(f"unsupported: {ast.unparse(node)[:40]}")

    try:
        result = value(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError) as e:
        return f"error: {e}"
    return str(int(result)) if float(result).is_integer() else f"{result:.6g}"


class Calculator:
    def __init__(self, row: dict[str, Any], turn_penalty: float = 0.0) -> None:
        self.question = str(row["prompt"])
        self.answer = float(row["answer"])
        self.turn_penalty = turn_penalty
        self.tools = [
            Tool(
                "calculator",
                "Evaluate an arithmetic expression (+ - * / // % and parentheses).",
                {
                    "type": "object",
                    "properties": {"expression": {"type": "string"}},
                    "required": ["expression"],
                },
                evaluate,
            )
        ]

    def reset(self) -> list[Message]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.question}]

    def step(self, message: str) -> Step:
        return final_answer(message, self.answer, self.turn_penalty)


def final_answer(message: str, answer: float, penalty: float = 0.0) -> Step:
    """The episode's end on a reply without a tool call: reward 1 when its last number is
    ``answer``, less ``penalty`` (``info["correct"]`` counts the right ones)."""
    numbers = _NUMBER.findall(message)
    correct = bool(numbers) and float(numbers[-1]) == answer
    return Step(reward=float(correct) - penalty, done=True, info={"correct": float(correct)})


# Half add and half subtract, so that no one operator for every problem pays: a policy must
# read the problem (a shift towards "+" on 2 of 3 problems left the third's groups all wrong,
# with no advantage to learn from).
_PROBLEMS: list[tuple[str, Callable[[int, int, int], int]]] = [
    (
        "A shop has {a} boxes with {b} pens in each and sells {c} pens. How many pens are left?",
        lambda a, b, c: a * b - c,
    ),
    (
        "A train runs {a} km an hour for {b} hours, then {c} km more. How far does it go?",
        lambda a, b, c: a * b + c,
    ),
    (
        "{a} rows of {b} chairs, and {c} more chairs by the door. How many chairs?",
        lambda a, b, c: a * b + c,
    ),
    (
        "A farm packs {a} crates of {b} eggs, and {c} eggs break. How many eggs are whole?",
        lambda a, b, c: a * b - c,
    ),
]


# What a format warm-up's tool calls compute: the problem's numbers, combined at random (one of
# these is right for each problem), so the warm-up teaches the tool's use and not the problems.
_GUESSES = ["{a} * {b} + {c}", "{a} * {b} - {c}", "{a} + {b} * {c}", "({a} + {b}) * {c}"]


def rows(n: int, seed: int = 0, kind: str = "problems") -> list[dict[str, Any]]:
    """``n`` problems, deterministic in ``seed``: ``{"prompt", "answer"}`` (``data.source:
    calculator``), or with ``kind="format"`` (``calculator/format``) SFT conversations that
    call the tool on a random combination of the numbers and answer with its result, under the
    system message an episode starts with (for a chat template without a tool format of its
    own, SmolLM2's): the format, not the solution."""
    if kind not in ("problems", "format"):
        raise ValueError(f"calculator/{kind}: the sources are calculator and calculator/format")
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n):
        text, solve = _PROBLEMS[i % len(_PROBLEMS)]
        a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(2, 99)
        question = text.format(a=a, b=b, c=c)
        if kind == "problems":
            out.append({"prompt": question, "answer": str(solve(a, b, c))})
            continue
        env = Calculator({"prompt": question, "answer": 0})
        expression = rng.choice(_GUESSES).format(a=a, b=b, c=c)
        call = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
        result = evaluate(expression)
        messages = [
            *with_instructions(env.reset(), env.tools),
            {"role": "assistant", "content": f"{OPEN}{call}{CLOSE}"},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": f"The answer is {result}."},
        ]
        out.append({"messages": messages})
    return out
