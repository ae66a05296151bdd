"""``dist-ft explain [KEY]``: what a config key means, read from the schema itself.

Every field of the config's dataclasses carries its documentation as the string literal after
it (an attribute docstring); this module prints it with the key's type, range and default. The
schema is the one source: a test checks that no field lacks a docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import textwrap
import typing
from functools import cache
from typing import Annotated, Any

from dist_ft.config.schema import Config, ConfigError
from dist_ft.ranges import Range


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``cls``'s attribute docstrings: {field name: the string literal that follows it}."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for st, nxt in itertools.pairwise(body):
        if (
            isinstance(st, ast.AnnAssign)
            and isinstance(st.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[st.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _unwrap(tp: Any) -> tuple[Any, list[Range]]:
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        return base, [e for e in extras if isinstance(e, Range)]
    return tp, []


def _type_text(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__ if not issubclass(tp, str) or tp is str else f"one of {_values(tp)}"
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def _values(tp: type) -> str:
    return ", ".join(repr(m.value) for m in tp)  # type: ignore[attr-defined]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return getattr(value, "value", value)  # an enum member as its YAML spelling


def leaves(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every key under ``cls`` as (dotted key, type text, default, doc); sections as
    (key, "section", None, doc) before their keys."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    out: list[tuple[str, str, Any, str]] = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp, ranges = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out.append((key, "section", None, docs.get(f.name, "")))
            out += leaves(tp, key + ".")  # type: ignore[arg-type]
            continue
        text = _type_text(tp) + "".join(f", {r}" for r in ranges)
        out.append((key, text, _default(f), docs.get(f.name, "")))
    return out


def explain(key: str | None = None) -> str:
    """The text ``dist-ft explain KEY`` prints: the key (or every key of a section, or the
    whole tree) with its type, range, default and meaning. ConfigError for an unknown key."""
    rows = leaves()
    if key:
        picked = [r for r in rows if r[0] == key or r[0].startswith(key + ".")]
        if not picked:
            close = difflib.get_close_matches(key, [r[0] for r in rows], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"explain: no config key {key!r}{hint}", keys=(key,))
        rows = picked
    blocks = []
    for name, kind, default, doc in rows:
        head = f"{name}  ({kind})" if kind == "section" else f"{name}: {kind} = {default!r}"
        body = textwrap.indent(textwrap.fill(doc, 96), "    ") if doc else ""
        blocks.append(head + ("\n" + body if body else ""))
    return "\n".join(blocks)
