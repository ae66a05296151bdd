"""The pieces of a multi-turn episode that need no model: tool-call parsing, the calculator,
the chat codec's token rule, and how env.name is resolved and configured."""

from __future__ import annotations

import pytest

from dist_ft.config import ConfigError, load_config
from dist_ft.envs import EnvError, Step, Tool, resolve_env
from dist_ft.envs.calculator import Calculator, evaluate, rows
from dist_ft.envs.chat import ChatCodec
from dist_ft.envs.tools import BadCall, Call, instructions, parse_calls
from dist_ft.model.tiny import build_tokenizer

SCHEMA = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
ECHO = Tool("echo", "returns x", SCHEMA, lambda x: x)
TOOLS = {"echo": ECHO}


def test_tool_calls_are_parsed_in_order():
    text = (
        'a <tool_call>{"name": "echo", "arguments": {"x": "1"}}</tool_call> b '
        '<tool_call>{"name": "echo", "arguments": {"x": "2"}}</tool_call>'
    )
    assert parse_calls(text, TOOLS) == [Call(ECHO, {"x": "1"}), Call(ECHO, {"x": "2"})]
    assert parse_calls("the answer is 4", TOOLS) == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('["echo"]', '{"name": ..., "arguments": {...}}'),
        ('{"name": "nope", "arguments": {}}', "no tool 'nope'; tools: ['echo']"),
        ('{"name": "echo", "arguments": "x"}', "must be a JSON object"),
        ('{"name": "echo", "arguments": {}}', "echo needs ['x']"),
        ('{"name": "echo", "arguments": {"x": "1", "y": 2}}', "takes no ['y']"),
    ],
)
def test_a_malformed_call_says_what_was_wrong(body, reason):
    (call,) = parse_calls(f"<tool_call>{body}</tool_call>", TOOLS)
    assert isinstance(call, BadCall) and reason in call.reason


def test_an_unclosed_call_is_read_to_the_end():
    (call,) = parse_calls('<tool_call>{"name": "echo", "arguments": {"x": "1"}}', TOOLS)
    assert call == Call(ECHO, {"x": "1"})


def test_instructions_name_the_format_and_every_tool():
    text = instructions([ECHO])
    assert "<tool_call>" in text and '"name": "echo"' in text and '"required": ["x"]' in text


@pytest.mark.parametrize(
    ("expression", "value"),
    [("12 * 7 + 3", "87"), ("(40 - 4) / 8", "4.5"), ("7 // 2", "3"), ("-3 % 5", "2")],
)
def test_calculator_evaluates_arithmetic(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize("expression", ["__import__('os')", "2 ** 999999", "x + 1", "1 / 0", "1 +"])
def test_calculator_refuses_anything_else_with_a_message(expression):
    assert evaluate(expression).startswith("error: ")


def test_calculator_rewards_the_last_number_of_the_final_reply():
    env = Calculator({"prompt": "What is 12 * 7 + 3?", "answer": "87"}, turn_penalty=0.1)
    assert env.reset()[-1] == {"role": "user", "content": "What is 12 * 7 + 3?"}
    assert env.step("84 + 3 = 87") == Step(reward=0.9, done=True, info={"correct": 1.0})
    assert env.step("87? no, 88").reward == pytest.approx(-0.1)


def test_calculator_rows_are_deterministic_and_right():
    assert rows(6, seed=3) == rows(6, seed=3) != rows(6, seed=4)
    for row in rows(30):
        numbers = [int(t) for t in row["prompt"].replace("?", " ").split() if t.isdigit()]
        a, b, c = numbers
        assert int(row["answer"]) in (a * b - c, a * b + c)


CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_codec_appends_the_templates_turn_delimiters_once():
    tok = build_tokenizer()
    tok.chat_template = CHATML  # ChatML's shape: the end-of-turn token is the EOS
    codec = ChatCodec(tok, [])
    seen = [{"role": "tool", "content": "42"}]
    after_eos = tok.convert_ids_to_tokens(codec.between(seen, ended_with_eos=True))
    # the model's EOS closed its turn: the template's own is not written again
    assert "".join(after_eos) == "\n<|tool|>42</s>\n<|assistant|>"
    cut = tok.convert_ids_to_tokens(codec.between(seen, ended_with_eos=False))
    assert "".join(cut) == "</s>\n<|tool|>42</s>\n<|assistant|>"  # a cut turn is closed


def test_codec_teaches_tools_in_a_system_message_when_the_template_cannot():
    tok = build_tokenizer()
    ids = ChatCodec(tok, [ECHO]).prompt([{"role": "user", "content": "hi"}])
    text = tok.decode(ids)
    assert text.startswith("<|system|>You can call tools.") and text.endswith("<|assistant|>")


def test_resolve_env_names_what_is_wrong():
    assert resolve_env("calculator") is Calculator
    with pytest.raises(EnvError, match="cannot import no_such_module"):
        resolve_env("no_such_module:Env")
    with pytest.raises(EnvError, match="has no Nope"):
        resolve_env("dist_ft.envs.calculator:Nope")
    with pytest.raises(EnvError, match="it has no reset, step"):
        resolve_env("dist_ft.envs.base:Tool")


def test_env_config_keys():
    cfg = load_config(None, ["env.name=calculator", "env.max_turns=2", "reward.functions=[]"])
    assert (cfg.env.name, cfg.env.max_turns) == ("calculator", 2)
    assert load_config(None, []).env.name is None
    with pytest.raises(ConfigError, match=r"env\.max_turn"):
        load_config(None, ["env.max_turn=2"])
    with pytest.raises(ConfigError, match=r"reward\.functions is empty"):
        load_config(None, ["reward.functions=[]"])  # single-turn: nothing would score


def test_codec_gives_the_schemas_to_a_template_that_renders_tools():
    tok = build_tokenizer()
    tok.chat_template = (  # as Qwen2.5's does: the schemas go into the template's own text
        "{% if tools %}<|system|>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}\n"
        "{% endif %}" + CHATML
    )
    text = tok.decode(ChatCodec(tok, [ECHO]).prompt([{"role": "user", "content": "hi"}]))
    assert text.startswith("<|system|>echo;<|user|>hi") and "You can call tools" not in text
