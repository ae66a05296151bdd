"""Reading a config: YAML, then ``a.b=c`` overrides, coerced to the schema's types with one-line
errors that name the key and where its value came from (file or command line)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import math
import re
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from dist_ft.config.schema import Config, ConfigError
from dist_ft.ranges import Range


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        out = _coerce(value, base, key)
        number = isinstance(out, int | float) and not isinstance(out, bool)
        for rng in extras:
            if isinstance(rng, Range) and number and out not in rng:
                rule = rng if math.isfinite(out) else "finite"  # YAML's .nan and .inf
                raise ConfigError(f"{key}={value}: must be {rule}", keys=(key,))
        return out
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(
                f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}", keys=(key,)
            )
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}", keys=(key,))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(
                f"{key}: expected a list, got {type(value).__name__} {value!r}", keys=(key,)
            )
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}", keys=(key,))
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # an annotation: a class
        if isinstance(value, tp):  # a default: rebuilt so that its values are checked too
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping, got {type(value).__name__} {value!r}", keys=(key,)
            )
        return _build(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(
                f"{key}: expected one of {[m.value for m in tp]}, got {value!r}", keys=(key,)
            ) from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(
                f"{key}: expected bool, got {type(value).__name__} {value!r}", keys=(key,)
            )
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"{key}: expected int, got {type(value).__name__} {value!r}", keys=(key,)
            )
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(
                f"{key}: expected float, got {type(value).__name__} {value!r}", keys=(key,)
            )
        return float(value)
    if tp is type(None):  # the None arm of an optional key ("null" in YAML)
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}", keys=(key,))
        return None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(
                f"{key}: expected str, got {type(value).__name__} {value!r}", keys=(key,)
            )
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a schema bug, not user error


# Keys that moved, old -> new: a config written for an older dist_ft gets the new name.
MOVED = {
    f"algo.{k}": f"grpo.{k}"
    for k in (
        *("loss", "scale_rewards", "advantage", "eps_low", "eps_high", "beta"),
        *("sft_warmup_steps", "max_staleness"),
    )
}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            if full in MOVED:
                raise ConfigError(
                    f"config key '{full}' is now '{MOVED[full]}' (each objective's settings have "
                    "their own section): rename it",
                    keys=(full,),
                )
            valid = [f"{prefix}.{n}" if prefix else n for n in names]
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {names}"
            raise ConfigError(f"unknown config key '{full}'{hint}", keys=(full,))
    kwargs = {}
    for f in fields:
        # Defaults go through the same checks as set values: a retuned default out of its
        # range fails every load, blamed on "defaults".
        if f.name in data:
            value = data[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue  # required: cls() below names it
        kwargs[f.name] = _coerce(value, hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
    try:
        return cls(**kwargs)
    except ConfigError:  # a cross-key rule of Config: it names its keys
        raise
    except (TypeError, ValueError) as e:  # a required field missing, or a rule of the section
        raise ConfigError(f"{prefix or 'config'}: {e}", keys=(prefix,)) from None


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted keys of the values in ``tree``; a list or a scalar is one value."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _blame(keys: Sequence[str], sources: dict[str, str]) -> str:
    """Where the values of ``keys`` were set: the file and/or the overrides that set any of them,
    else "defaults". A key matches the value set at it, above it or below it."""
    named = []
    for key in keys or sources:
        key = re.sub(r"\[\d+\]", "", key)  # list items come with their list
        named += [
            src
            for k, src in sources.items()
            if k == key or k.startswith(f"{key}.") or key.startswith(f"{k}.")
        ]
    return " and ".join(dict.fromkeys(named)) or "defaults"


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {path} is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not loaded:  # an empty file would otherwise train the defaults without a word
        raise ConfigError(
            f"{path} is empty (it sets no keys); to train the built-in defaults run `dist-ft demo`"
        )
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML-safe dict (enums as their values)."""

    def plain(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from defaults, an optional YAML file and ``a.b=c`` overrides.

    Every key's type and range is checked, then the cross-field rules; an error names the key
    and the source that set it (the file, the override, or the defaults).
    """
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}  # dotted key -> where its value came from
    if path is not None:
        tree = _read_yaml(path)
        sources = dict.fromkeys(_leaves(tree), str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:  # an unclosed flow list or mapping (`a.b=[8`) is no value
            _set_path(tree, key, yaml.safe_load(raw) if raw else "")
        except yaml.YAMLError as e:
            why = f"{raw!r} is not a YAML value ({getattr(e, 'problem', None) or e})"
            raise ConfigError(
                f"command-line override '{item}': {why}; close it or quote it"
            ) from None
        # the override replaces the whole value at `key`, whatever the file set below it
        sources = {k: s for k, s in sources.items() if not k.startswith(f"{key}.")}
        sources[key] = f"command-line override '{item}'"
    try:
        return _build(Config, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{_blame(e.keys, sources)}: {e}", e.keys) from None
