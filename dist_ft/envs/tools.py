"""Tool calls in the model's text: the format, the parser, and the prompt that teaches it.

The format is the tagged JSON that Qwen2.5's and Hermes' chat templates use, so a model trained
on those needs no new habit::

    <tool_call>{"name": "calculator", "arguments": {"expression": "12 * 7"}}</tool_call>

A turn may hold several calls. A chat template that renders ``tools`` itself (it mentions them,
as Qwen2.5's does) is given the schemas; one that does not (SmolLM2's, the tiny model's) gets
:func:`instructions` as a system message instead. A call that cannot be run (bad JSON, an unknown
tool, arguments that are not an object or lack a required one) becomes a :class:`BadCall` whose
``reason`` is shown to the model as the tool's answer: a mistake is an observation, never a crash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from dist_ft.envs.base import Message, Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class Call:
    tool: Tool
    arguments: dict[str, Any]


@dataclass(frozen=True)
class BadCall:
    reason: str  # what the model sees: what was wrong, so it can do better next turn


def parse_calls(text: str, tools: dict[str, Tool]) -> list[Call | BadCall]:
    """Every ``<tool_call>`` in ``text``, in order; [] when it has none (a final answer). An
    unclosed tag at the end of the text (the turn ran out of tokens) is read to the end."""
    calls: list[Call | BadCall] = []
    for match in _CALL.finditer(text):
        body = match.group(1).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(BadCall(f"error: tool call is not valid JSON ({e.msg}): {body[:80]!r}"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(BadCall('error: a tool call is {"name": ..., "arguments": {...}}'))
            continue
        tool = tools.get(obj["name"])
        if tool is None:
            calls.append(BadCall(f"error: no tool {obj['name']!r}; tools: {sorted(tools)}"))
            continue
        arguments = obj.get("arguments", {})
        if not isinstance(arguments, dict):
            calls.append(BadCall(f"error: {tool.name}'s arguments must be a JSON object"))
            continue
        required = tool.parameters.get("required", [])
        if missing := [k for k in required if k not in arguments]:
            calls.append(BadCall(f"error: {tool.name} needs {missing}"))
            continue
        known = tool.parameters.get("properties", {})
        if extra := sorted(set(arguments) - set(known)):
            calls.append(BadCall(f"error: {tool.name} takes no {extra}; it takes {sorted(known)}"))
            continue
        calls.append(Call(tool, arguments))
    return calls


def instructions(tools: list[Tool]) -> str:
    """The system message that teaches the tagged format to a model whose chat template has
    no tool format of its own."""
    schemas = "\n".join(json.dumps(t.schema()["function"]) for t in tools)
    return (
        "You can call tools. To call one, write "
        f'{OPEN}{{"name": <tool name>, "arguments": <JSON object>}}{CLOSE}; '
        "its result comes back in the next message. When you have the answer, reply without "
        f"a tool call.\nTools:\n{schemas}"
    )


def with_instructions(messages: list[Message], tools: list[Tool]) -> list[Message]:
    """``messages`` with :func:`instructions` in the system message (appended to the first
    message when that is a system message, else a system message of its own, first)."""
    text = instructions(tools)
    if messages and messages[0]["role"] == "system":  # one system message, theirs first
        return [
            {"role": "system", "content": messages[0]["content"] + "\n\n" + text},
            *messages[1:],
        ]
    return [{"role": "system", "content": text}, *messages]


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders a ``tools`` list itself (Qwen2.5's does)."""
    return bool(chat_template) and "tools" in str(chat_template)
