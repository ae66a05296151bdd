"""The shell commands README.md shows: the one parser every doc test uses, so a README edit that
breaks a command fails a test instead of a user."""

from __future__ import annotations

import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_lines(readme: Path = ROOT / "README.md") -> list[str]:
    """Every command in ``readme``'s ```bash blocks, in order, as the shell line a user pastes:
    continuation lines joined, comment lines and trailing comments dropped (so that a test can
    append overrides), the rest byte for byte."""
    lines = []
    for block in readme.read_text().split("```bash")[1:]:
        body = block.split("```", 1)[0].replace("\\\n", " ")
        for line in body.splitlines():
            argv = shlex.split(line, comments=True)
            if not argv:
                continue
            # A '#' starts a comment only where the shell sees a new word: cut at the first one
            # after which the words are still the command's.
            cuts = [i for i, c in enumerate(line) if c == "#" and line[i - 1 : i].isspace()]
            cut = next((i for i in cuts if shlex.split(line[:i]) == argv), len(line))
            lines.append(line[:cut].strip())
    return lines


def readme_commands() -> list[list[str]]:
    """``readme_lines()`` as argv lists."""
    return [shlex.split(line) for line in readme_lines()]


def readme_command(*prefix: str) -> list[str]:
    """The first README command that starts with ``prefix`` (an error when there is none)."""
    for argv in readme_commands():
        if argv[: len(prefix)] == list(prefix):
            return argv
    raise LookupError(f"README.md shows no command starting with {' '.join(prefix)!r}")
