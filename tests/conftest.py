"""Fixtures every tier shares, and the environment every test runs in. Helper functions live in
support.py (imported as ``from support import ...``)."""

from __future__ import annotations

import os

import pytest

# Tests never talk to wandb servers, and never fetch from a hub.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from dist_ft.config import TinyModelConfig
    from dist_ft.model.loading import resolve_model_path

    return resolve_model_path("tiny", TinyModelConfig())


@pytest.fixture(scope="session")
def demo_prompts():
    from dist_ft.data import demo_rows
    from dist_ft.wire.prompt import Prompt

    return [Prompt(i, r["prompt"], r["answer"]) for i, r in enumerate(demo_rows(16, seed=1))]
