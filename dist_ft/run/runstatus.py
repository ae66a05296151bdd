"""A run's state in ``<output_dir>/status.json``, and the signals that stop it cleanly.

Every training loop (GRPO's ``recipes.grpo.train``, SFT/DPO's ``recipes.sft_dpo.train_offline``)
keeps one :class:`RunStatus`: ``running`` from the start, with the process id, host and the last
step trained (rewritten after each step), then ``finished``, ``interrupted`` (SIGINT, SIGTERM) or
``failed`` with a one-line reason. A process that dies without a word (SIGKILL, the OOM killer,
a reward that calls ``os._exit``) leaves ``running``: :func:`unfinished` tells that apart from a
live run by its pid, so every command that reads a run (export, compare, merge of a run
directory, resume) can say what happened instead of trusting whatever files are there.

SIGTERM (SLURM's time limit and ``scancel``, Kubernetes evictions, ``ray job stop``, ``timeout``)
is handled as Ctrl-C is: both raise :class:`Interrupted` (a ``KeyboardInterrupt``), but never
inside a step's update and its bookkeeping (:meth:`RunStatus.step`), so what is saved on the way
out is the state after a whole step. A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

STATUS_FILE = "status.json"
RUNNING, FINISHED, INTERRUPTED, FAILED = "running", "finished", "interrupted", "failed"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised between steps; ``signum`` says which (the exit code follows)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunStatus:
    """The status file of the run in ``out``, and the SIGINT/SIGTERM handlers of its loop."""

    def __init__(self, out: Path, step: int, total: int) -> None:
        self.path = out / STATUS_FILE
        self.total = total
        self._depth = 0  # > 0 inside a step: a signal waits for its end
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}
        self.update(step)

    def update(self, step: int, state: str = RUNNING, reason: str | None = None) -> None:
        self.done = step
        row = {
            "state": state,
            "step": step,
            "steps": self.total,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if reason is not None:
            row["reason"] = reason
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row) + "\n")
        os.replace(tmp, self.path)  # never half a file, whatever kills the process

    def handle_signals(self) -> None:
        """SIGTERM and SIGINT raise :class:`Interrupted` from here on (SIGINT only where it
        is not ignored: a shell without job control starts its children so, on purpose)."""
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for signum in (signal.SIGTERM, signal.SIGINT):
            current = signal.getsignal(signum)
            if signum == signal.SIGINT and current is not signal.default_int_handler:
                continue
            self._previous[signum] = current
            signal.signal(signum, self._on_signal)

    def restore_signals(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._depth and self._signal is None:
            self._signal = signum  # raised when the step ends
            return
        self._signal = None
        raise Interrupted(signum)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """A step's update and its bookkeeping (ledger, metrics, checkpoint): a signal that
        arrives inside is raised after it, so the learner never holds a half-recorded step."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._signal is not None:
            signum, self._signal = self._signal, None
            raise Interrupted(signum)


def read(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's status.json, or None (a run from before status.json, or an unreadable one)."""
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def running_here(status: dict[str, Any]) -> bool:
    """A ``running`` status whose process is alive on this host."""
    return (
        status["state"] == RUNNING
        and status["host"] == socket.gethostname()
        and _alive(status["pid"])
    )


def unfinished(run_dir: str | Path) -> str | None:
    """Why the run in ``run_dir`` has not finished, as a predicate ("was interrupted at step 4
    (SIGTERM)", "ended without finishing (...)"); None when it finished or has no status.json."""
    s = read(run_dir)
    if s is None or s.get("state") == FINISHED:
        return None
    step, where = s.get("step"), f"pid {s.get('pid')} on {s.get('host')}"
    if s.get("state") == RUNNING:
        if running_here(s):
            return f"is still running ({where}, step {step} of {s.get('steps')})"
        if s.get("host") == socket.gethostname():
            return f"ended without finishing (killed or crashed at step {step}; {where} is gone)"
        return (
            f"was running on another host ({where}, step {step}, "
            f"{s.get('time')}); if that process is gone, it ended without finishing"
        )
    verb = "was interrupted" if s.get("state") == INTERRUPTED else str(s.get("state"))
    return f"{verb} at step {step} ({s.get('reason')})"
