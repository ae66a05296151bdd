"""User rewards that misbehave, importable as ``reward_fns:NAME`` (tests/ is on the path)."""

import threading


def raises(prompts, completions, answers):
    raise ZeroDivisionError("user bug")


def nan_on_odd(prompts, completions, answers):
    """NaN for every odd sample: those samples, and only those, have a reward error."""
    return [float("nan") if i % 2 else 1.0 + 0.1 * (i % 4) for i in range(len(completions))]


_released = threading.Event()


def hangs(prompts, completions, answers):
    _released.wait(60)  # far past any test's reward.timeout_s
    return [0.0] * len(completions)


def length(prompts, completions, answers):
    """A well-behaved reward: longer completions score more."""
    return [float(len(c)) for c in completions]
