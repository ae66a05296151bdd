import os
import signal

import pytest

# Tests never talk to wandb servers, and never fetch from a hub.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from dist_ft.config import TinyModelConfig
    from dist_ft.models import resolve_model_path

    return resolve_model_path("tiny", TinyModelConfig())


@pytest.fixture(scope="session")
def demo_prompts():
    from dist_ft.data import Prompt, demo_rows

    return [Prompt(i, r["prompt"], r["answer"]) for i, r in enumerate(demo_rows(16, seed=1))]


def build(tiny_path: str, *overrides: str):
    """RolloutWorker and Learner constructor kwargs for a config with ``overrides``."""
    from dist_ft.config import load_config
    from dist_ft.trainer import component_kwargs

    cfg = load_config(None, ["run.wandb=disabled", *overrides])
    return cfg, *component_kwargs(cfg, tiny_path)


def terminal_sigint() -> None:
    """``preexec_fn`` for a child that a test interrupts as a terminal's Ctrl-C would. A shell
    without job control (a CI script, ``cmd &``) starts its children with SIGINT ignored, and
    Python then never raises KeyboardInterrupt: a user at a terminal has the default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
