"""``code_editor``: a small workspace with a bug and failing unit tests; fix it with tools.

Each episode gets its own directory holding the row's files (``files``: name -> text); its
tests (``tests``: Python snippets, each an ``assert``) import them. Tools: ``view`` a file (with
line numbers), ``replace`` a string that occurs exactly once in a file, ``run_tests``. The
model's first reply without a tool call ends the episode, and the reward is the share of tests
that pass then (less ``turn_penalty`` per model turn); an episode cut off by ``env.max_turns``
gets 0, as a change never submitted. Paths are resolved inside the workspace and anything that
leaves it (``..``, an absolute path, a link) is refused with an error the model sees
(``env/refused_paths``). Tests run in the reward sandbox (``dist_ft/rewards/sandbox.py``) with the
workspace as its only writable directory.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dist_ft.envs.base import Message, Step, Tool
from dist_ft.rewards.sandbox import run_python

SYSTEM = (
    "You are editing code in a workspace. Use the tools to read the files, fix the bug and run "
    "the tests. Reply with a short message and no tool call when you are done."
)
_STRING = {"type": "string"}


class CodeEditor:
    def __init__(
        self, row: dict[str, Any], turn_penalty: float = 0.0, timeout_s: float = 5.0
    ) -> None:
        self.files: dict[str, str] = dict(row["files"])
        self.tests: list[str] = list(row["tests"])
        self.task = str(row["prompt"])
        self.turn_penalty, self.timeout_s = turn_penalty, timeout_s
        self.turns, self.refused = 0, 0
        self.root = Path(tempfile.mkdtemp(prefix="dist_ft-code-editor-")).resolve()
        for name, text in self.files.items():
            self._path(name).write_text(text)
        obj = "object"
        self.tools = [
            Tool("view", "Show a file with line numbers.",
                 {"type": obj, "properties": {"path": _STRING}, "required": ["path"]}, self.view),
            Tool("replace", "Replace text that occurs exactly once in a file.",
                 {"type": obj, "properties": {"path": _STRING, "old": _STRING, "new": _STRING},
                  "required": ["path", "old", "new"]}, self.replace),
            Tool("run_tests", "Run the unit tests.", {"type": obj, "properties": {}},
                 self.run_tests),
        ]  # fmt: skip

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            self.refused += 1
            raise PermissionError(f"{name} is outside the workspace")
        return path

    def view(self, path: str) -> str:
        try:
            lines = self._path(path).read_text().splitlines()
        except (OSError, PermissionError) as e:
            return f"error: {e}"
        return "\n".join(f"{i + 1:3d} {line}" for i, line in enumerate(lines))

    def replace(self, path: str, old: str, new: str) -> str:
        try:
            file = self._path(path)
            text = file.read_text()
        except (OSError, PermissionError) as e:
            return f"error: {e}"
        if (count := text.count(old)) != 1 or not old:
            return f"error: the text to replace occurs {count} times in {path}; it must occur once"
        file.write_text(text.replace(old, new))
        return f"replaced in {path}"

    def _passed(self) -> tuple[float, str]:
        result = run_python("import sys\nsys.path.insert(0, '.')", self.tests,
                            workspace=self.root, timeout_s=self.timeout_s)  # fmt: skip
        return result.reward, result.error or ""

    def run_tests(self) -> str:
        share, error = self._passed()
        passed = round(share * len(self.tests))
        return f"{passed}/{len(self.tests)} tests pass" + (
            f"; first failure: {error}" if error else ""
        )

    def reset(self) -> list[Message]:
        listing = ", ".join(sorted(self.files))
        return [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{self.task}\nFiles: {listing}"},
        ]

    def step(self, message: str) -> Step:
        share, _ = self._passed()
        info = {"tests_passed": share, "refused_paths": float(self.refused)}
        return Step(reward=share - self.turn_penalty, done=True, info=info)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# (task, module, buggy source, asserts): one bug each, a one-line fix
TASKS: list[tuple[str, str, str, list[str]]] = [
    ("mean() is wrong.", "stats",
     "def mean(xs):\n    return sum(xs) / (len(xs) - 1)\n",
     ["mean([1, 2, 3]) == 2", "mean([4]) == 4"]),
    ("clamp() returns the wrong bound.", "clamp",
     "def clamp(x, lo, hi):\n    return max(hi, min(lo, x))\n",
     ["clamp(5, 0, 3) == 3", "clamp(-1, 0, 3) == 0", "clamp(2, 0, 3) == 2"]),
    ("count_vowels() misses a vowel.", "text",
     "def count_vowels(s):\n    return sum(c in 'aeio' for c in s.lower())\n",
     ["count_vowels('fun') == 1", "count_vowels('AEIOU') == 5"]),
    ("factorial() is off by one.", "fact",
     "def factorial(n):\n    out = 1\n    for i in range(1, n):\n        out *= i\n"
     "    return out\n",
     ["factorial(1) == 1", "factorial(4) == 24", "factorial(5) == 120"]),
    ("reverse_words() loses the spaces.", "words",
     "def reverse_words(s):\n    return ''.join(reversed(s.split()))\n",
     ["reverse_words('a b c') == 'c b a'", "reverse_words('hi') == 'hi'"]),
    ("argmax() returns the value, not its index.", "argmax",
     "def argmax(xs):\n    return max(xs)\n",
     ["argmax([3, 9, 2]) == 1", "argmax([7]) == 0"]),
]  # fmt: skip


def rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows dealt from :data:`TASKS` in a seeded order: ``{"prompt", "files", "tests"}``."""
    order = list(range(len(TASKS)))
    random.Random(seed).shuffle(order)
    out = []
    for i in range(n):
        task, module, source, asserts = TASKS[order[i % len(TASKS)]]
        tests = [f"from {module} import *\nassert {a}" for a in asserts]
        out.append({"prompt": f"{task} Fix {module}.py.", "files": {f"{module}.py": source},
                    "tests": tests})  # fmt: skip
    return out
