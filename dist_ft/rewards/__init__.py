"""Reward functions: built-in verifiers, ``module:function`` user rewards, extra named scorers.

Multi-task: each function scores the tasks it names (none named: every task); a sample's total
is the weighted sum of the functions of its task. Shapes: N = scored samples (prompts x group),
K = reward functions, in spec order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import inspect
import math
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from dist_ft.rewards import rules, sandbox
from dist_ft.tasks import DEFAULT_TASK


class RewardFn(Protocol):
    """A batch scorer; ``async def`` scorers are awaited (and cancelled on timeout)."""

    def __call__(
        self, prompts: list[str], completions: list[str], answers: list[str | None], **kw: Any
    ) -> Sequence[float] | Awaitable[Sequence[float]]: ...


BUILTIN: dict[str, Callable[..., list[float]]] = {
    "exact_match": rules.exact_match,
    "char_match": rules.char_match,
    "format_regex": rules.format_regex,
    "length_penalty": rules.length_penalty,
    "math_answer": rules.math_answer,
    "code_tests": sandbox.code_tests,  # model-written Python run against tests, sandboxed
}

# How long a timed-out coroutine gets to run its cancellation handlers before it is abandoned.
_CANCEL_GRACE_S = 1.0


class RewardError(RuntimeError):
    """A reward function cannot be used (unknown, unloadable, none configured); names it."""


def resolve(name: str, extra: Mapping[str, Callable[..., Any]] | None = None) -> Callable[..., Any]:
    """A scorer from ``extra`` (e.g. ``{"judge": ...}``), a built-in verifier by name, or a user
    function given as ``package.module:function``; in that order."""
    if extra and name in extra:
        return extra[name]
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        known = sorted(BUILTIN) + sorted(extra or {})
        raise RewardError(
            f"unknown reward '{name}': use one of {known} or 'package.module:function'"
        )
    module_name, fn_name = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"cannot load reward '{name}': {e}") from None
    if not callable(fn):
        raise RewardError(f"reward '{name}' is not callable")
    return fn


def applies(fn_tasks: Sequence[Sequence[str]], tasks: Sequence[str]) -> torch.Tensor:
    """bool [N, K]: function k scores sample n, i.e. names its task ``tasks[n]`` or no task."""
    return torch.tensor(
        [[not named or task in named for named in fn_tasks] for task in tasks], dtype=torch.bool
    ).reshape(len(tasks), len(fn_tasks))


def task_mismatch(
    names: Sequence[str], fn_tasks: Sequence[Sequence[str]], data_tasks: Set[str], source: str
) -> str | None:
    """What ties the data's tasks and the reward functions wrongly, checked before step 1: a
    task of the data that no function scores, or a task a function names that the data lacks
    (a misspelt name would leave its function idle). None when every task is covered."""
    for task, covered in zip(sorted(data_tasks), applies(fn_tasks, sorted(data_tasks)).any(1)):
        if not covered:
            unnamed = f" (its rows have no task column: task '{DEFAULT_TASK}')"
            return (
                f"{source}: task '{task}' has no reward function"
                f"{unnamed if task == DEFAULT_TASK else ''}; name it in the tasks of one of "
                f"reward.functions {list(names)}, or add one without tasks"
            )
    for name, named in zip(names, fn_tasks):
        if absent := sorted(set(named) - data_tasks):
            return (
                f"reward '{name}' names tasks {absent} that {source} does not have "
                f"(its tasks: {sorted(data_tasks)})"
            )
    return None


@dataclass
class RewardScores:
    """Per-function scores of one batch. A failed entry is NaN in ``rewards_NK`` and True in
    ``errors_NK``; what to do with it (drop the sample, score it 0, stop the run) is the caller's
    policy. A function adds 0 to a sample of a task it does not score, and cannot fail on it."""

    rewards_NK: torch.Tensor  # float32 [N, K], NaN where errors_NK, 0 where k skips n's task
    errors_NK: torch.Tensor  # bool [N, K], True where function k failed for sample n
    messages: dict[str, str]  # reward name -> its first error message, failing functions only

    def total(self, weights_K: torch.Tensor, fill: float | None = None) -> torch.Tensor:
        """Weighted sum, float32 [N]. NaN in every row with a failed entry (even at weight 0),
        unless ``fill`` replaces failed entries first."""
        rewards_NK = self.rewards_NK
        if fill is not None:
            rewards_NK = rewards_NK.masked_fill(self.errors_NK, fill)
        return rewards_NK @ weights_K.to(rewards_NK.dtype)


class _Timeout(Exception):
    pass


async def _await_until(awaitable: Awaitable[Any], timeout_s: float) -> Any:
    # asyncio.wait, not wait_for: a TimeoutError the function raises itself stays its own error.
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout_s))
    if not done:
        task.cancel()
        with contextlib.suppress(BaseException):  # errors from its own cleanup don't matter now
            await task
        raise _Timeout
    return task.result()


class _Call:
    """One reward function call on its own daemon thread, with a deadline.

    A Python thread cannot be killed: a sync function that hangs is abandoned and runs on in the
    background (daemon, so it never blocks interpreter exit, which a ThreadPoolExecutor worker
    would). Every call gets a fresh thread, so the next call is never queued behind a hung one.
    A coroutine runs in a private event loop on that thread and is cancelled at the deadline.
    """

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict, timeout_s: float):
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.awaiting = threading.Event()
        self.deadline = time.monotonic() + timeout_s
        threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True).start()

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        try:
            out = fn(*args, **kwargs)
            if inspect.isawaitable(out):
                self.awaiting.set()
                out = asyncio.run(_await_until(out, self.deadline - time.monotonic()))
            # A generator runs here, under the deadline. A str, dict or set is iterable too but
            # is never a list of scores: it stays as it is and fails the check in _check_values.
            if isinstance(out, Iterable) and not isinstance(out, str | bytes | Mapping | Set):
                out = list(out)
            self.future.set_result(out)
        except BaseException as e:  # a user function may raise anything, even SystemExit
            self.future.set_exception(e)

    def outcome(self) -> tuple[Any, BaseException | None]:
        """What the function returned or raised; ``_Timeout`` past the deadline."""
        wait_s = max(0.0, self.deadline - time.monotonic())
        done, _ = concurrent.futures.wait([self.future], timeout=wait_s)
        if not done and self.awaiting.is_set():  # cancelled at the deadline; let it clean up
            done, _ = concurrent.futures.wait([self.future], timeout=_CANCEL_GRACE_S)
        if not done:
            raise _Timeout
        error = self.future.exception()
        if isinstance(error, _Timeout):  # the coroutine was cancelled at the deadline
            raise _Timeout
        return (None, error) if error is not None else (self.future.result(), None)


def call_with_deadline(fn: Callable[..., Any], args: tuple, timeout_s: float) -> Any:
    """``fn(*args)`` on its own thread (:class:`_Call`): what it returns, what it raises, or
    TimeoutError past ``timeout_s`` (the call is abandoned). Environments' calls run so."""
    try:
        out, error = _Call(fn, args, {}, timeout_s).outcome()
    except _Timeout:
        raise TimeoutError(f"no answer within {timeout_s} s") from None
    if isinstance(error, Exception):
        raise error
    if error is not None:  # SystemExit and the like: the caller's error, not our exit
        raise RuntimeError(f"raised {type(error).__name__}: {error}") from error
    return out


class _Failure(NamedTuple):
    """Why a call failed: ``message`` names the function and the first bad value; ``kind`` is
    the reason without what changes from call to call, so each kind is printed once."""

    message: str
    kind: str


def _as_number(v: Any) -> float | None:
    """``v`` as a float, None when it is no number. float() would parse "1.0", but a string is a
    bug in the reward, not a score."""
    if v is None or isinstance(v, str | bytes):
        return None
    try:
        return float(v)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        return None


def _check_values(name: str, out: Any, n: int) -> tuple[list[float], list[bool], _Failure | None]:
    """Scores [n] (NaN where invalid), failed flags [n], and the first problem."""
    if not isinstance(out, list):  # None, a number, a str, a dict...: nothing to index
        got = "None" if out is None else f"a {type(out).__name__}"
        failure = _Failure(f"reward '{name}' returned {got} for {n} samples", got)
        return [math.nan] * n, [True] * n, failure
    if len(out) != n:
        failure = _Failure(f"reward '{name}' returned {len(out)} scores for {n} samples", "count")
        return [math.nan] * n, [True] * n, failure
    numbers = [_as_number(v) for v in out]
    scores = [x if x is not None and math.isfinite(x) else math.nan for x in numbers]
    failed = [math.isnan(x) for x in scores]
    bad = [i for i, f in enumerate(failed) if f]
    if not bad:
        return scores, failed, None
    i, v, x = bad[0], out[bad[0]], numbers[bad[0]]
    if x is None:
        got = "None" if v is None else f"{type(v).__name__} {repr(v)[:50]}"
        message = f"reward '{name}' returned {got} for sample {i}, expected a number"
        kind = f"sample {type(v).__name__}"
    else:
        message = f"reward '{name}' returned {repr(v)[:50]} for sample {i}"
        kind = "sample nan" if math.isnan(x) else "sample inf"
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return scores, failed, _Failure(message + more, kind)


class RewardSet:
    """Reward functions scored side by side, each call under a timeout.

    ``specs`` are ``(name, weight, kwargs)``; a name is looked up by ``resolve`` (``extra`` first).
    ``tasks[k]``: the tasks function k scores, ``[]`` (or ``tasks=None``) every task. ``names``
    [K] and ``weights`` (float32 [K]) follow spec order.
    """

    def __init__(
        self,
        specs: list[tuple[str, float, dict[str, Any]]],
        timeout_s: float = 30.0,
        extra: Mapping[str, Callable[..., Any]] | None = None,
        tasks: Sequence[Sequence[str]] | None = None,
    ) -> None:
        if not specs:
            raise RewardError("no reward functions configured (reward.functions is empty)")
        if not timeout_s > 0:
            raise RewardError(f"reward timeout must be positive, got {timeout_s} s")
        if tasks is not None and len(tasks) != len(specs):
            raise ValueError(f"{len(tasks)} task lists for {len(specs)} reward functions")
        self.tasks = [list(t) for t in tasks] if tasks is not None else [[] for _ in specs]
        self.timeout_s = timeout_s
        self.names = [name for name, _, _ in specs]
        self.weights = torch.tensor([w for _, w, _ in specs], dtype=torch.float32)  # [K]
        self._fns = [(resolve(name, extra), dict(kwargs)) for name, _, kwargs in specs]
        self._reported: set[tuple[str, str]] = set()  # (name, failure kind) already printed

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        answers: list[str | None],
        tasks: list[str] | None = None,
    ) -> RewardScores:
        """Scores N samples with all K functions at once, each under ``timeout_s``.

        ``tasks``: each sample's task (None: every function scores every sample). A function is
        called with the samples of its tasks only, and not at all when there are none.

        Never raises for a failing function: one that raises, times out, or returns anything
        but a list (or tuple, generator, array) of one score per sample fails its whole column;
        a NaN, inf, None or non-number fails only its sample. Failures are NaN in
        ``rewards_NK``, True in ``errors_NK``, named in ``messages``, and each kind is printed
        to stderr once.
        """
        n, k = len(completions), len(self.names)
        if len(prompts) != n or len(answers) != n or (tasks is not None and len(tasks) != n):
            raise ValueError(
                f"{len(prompts)} prompts, {n} completions, {len(answers)} answers"
                + ("" if tasks is None else f", {len(tasks)} tasks")
                + ": must be equal"
            )
        applies_NK = torch.ones((n, k), dtype=torch.bool) if tasks is None else self.applies(tasks)
        rewards_NK = torch.zeros((n, k)).masked_fill(applies_NK, math.nan)  # float32
        errors_NK = applies_NK.clone()
        messages: dict[str, str] = {}
        rows_K = [applies_NK[:, j].nonzero().squeeze(1).tolist() for j in range(k)]

        def args(rows: list[int]) -> tuple[list[Any], ...]:
            # Copies: an abandoned call must not see the caller's lists change.
            return tuple([xs[i] for i in rows] for xs in (prompts, completions, answers))

        calls = [
            _Call(fn, args(rows), kwargs, self.timeout_s) if rows else None
            for (fn, kwargs), rows in zip(self._fns, rows_K)
        ]
        for j, (name, call, rows) in enumerate(zip(self.names, calls, rows_K)):
            if call is None:
                continue
            failure = None
            try:
                out, error = call.outcome()
            except _Timeout:
                failure = _Failure(f"reward '{name}' timed out after {self.timeout_s} s", "timeout")
            else:
                if error is not None:
                    kind = f"raised {type(error).__name__}"
                    failure = _Failure(f"reward '{name}' {kind}: {error}", kind)
                else:
                    scores, failed, failure = _check_values(name, out, len(rows))
                    rewards_NK[rows, j] = torch.tensor(scores, dtype=torch.float32)
                    errors_NK[rows, j] = torch.tensor(failed, dtype=torch.bool)
            if failure is not None:
                messages.setdefault(name, failure.message)
                self._report(name, failure)
        return RewardScores(rewards_NK, errors_NK, messages)

    def applies(self, tasks: Sequence[str]) -> torch.Tensor:
        """bool [N, K]: function k scores sample n of task ``tasks[n]``."""
        return applies(self.tasks, tasks)

    def _report(self, name: str, failure: _Failure) -> None:
        """Print a failure the first time its kind occurs, whatever the reward.on_error policy:
        a run must never drop or zero a reward without saying why. Repeats are only counted
        (reward/errors/<name>), or a broken reward would print on every step."""
        if (name, failure.kind) in self._reported:
            return
        self._reported.add((name, failure.kind))
        print(
            f"reward error: {failure.message} [printed once; every failure is counted in "
            f"reward/errors/{name}]",
            file=sys.stderr,
            flush=True,
        )
