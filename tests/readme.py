"""The shell commands README.md shows, as argv lists: the one parser every doc test uses, so a
README edit that breaks a command fails a test instead of a user."""

from __future__ import annotations

import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """Every command in README.md's ```bash blocks, in order: continuation lines joined, comment
    lines and trailing comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in text.split("```bash")[1:]:
        body = block.split("```", 1)[0].replace("\\\n", " ")
        commands += [
            argv for argv in map(lambda s: shlex.split(s, comments=True), body.splitlines()) if argv
        ]
    return commands


def readme_command(*prefix: str) -> list[str]:
    """The first README command that starts with ``prefix`` (an error when there is none)."""
    for argv in readme_commands():
        if argv[: len(prefix)] == list(prefix):
            return argv
    raise LookupError(f"README.md shows no command starting with {' '.join(prefix)!r}")
