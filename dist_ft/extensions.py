"""Extensions named in a config as ``package.module:attr`` (an engine, an environment): the one
import, with errors that name the key, the target and what went wrong."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any


def import_named(
    target: str, key: str, error: type[Exception], known: Iterable[str], form: str
) -> Any:
    """``module:attr`` imported: the attribute, or None when the module has none. ``error`` is
    raised for a malformed target (naming the ``known`` built-ins and the ``form`` expected)
    and for a module that fails to import (any error there is the user's to fix)."""
    module_name, _, attr = target.partition(":")
    if not (module_name and attr):
        raise error(f"{key}={target!r}: use one of {sorted(known)} or '{form}'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise error(
            f"{key}={target}: cannot import {module_name} ({type(e).__name__}: {e})"
        ) from None
    return getattr(module, attr, None)
