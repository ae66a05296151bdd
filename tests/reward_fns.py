"""User rewards that misbehave, importable as ``reward_fns:NAME`` (tests/ is on the path)."""

import os
import threading
import time


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


# Rewards that return the wrong thing, as users write them by mistake (issue #9).
def three_values(prompts, completions, answers):
    return [1.0, 0.0, 1.0]


def strings(prompts, completions, answers):
    return [1.0 if i != 2 else "abc" for i in range(len(completions))]


def returns_none(prompts, completions, answers):
    scores = [float(c == a) for c, a in zip(completions, answers)]  # noqa: F841, the bug: no return


def scalar(prompts, completions, answers):
    return 1.0


def wrong_signature(completions):
    return [0.0] * len(completions)


def always_zero(prompts, completions, answers):
    """Valid, and 0 for every sample: a reward the policy never satisfies."""
    return [0.0] * len(completions)


_calls = [0]


def exits_quietly(prompts, completions, answers):
    """A reward that ends the whole process, exit code 0, on its second call: nothing the run
    can catch, as a user's ``sys.exit`` in a forked helper or ``os._exit`` would."""
    _calls[0] += 1
    if _calls[0] == 2:
        os._exit(0)
    return [0.0] * len(completions)


def prints_secret(prompts, completions, answers):
    """Prints a secret of its environment (issue 20: it ended up in wandb's output.log)."""
    print(f"reward_fns: token={os.environ['DIST_FT_TEST_SECRET']}", flush=True)
    return [0.0] * len(completions)


def pause(prompts, completions, answers):
    """Scores nothing after a second's pause: a run whose steps last long enough for nodes to
    join and leave while it trains (tests/slow/test_fleet.py)."""
    time.sleep(1.0)
    return [0.0] * len(completions)
