"""Token ids for what the environment says, each message tokenised once and never again.

A multi-turn episode is one growing list of ids. The model's turns go in as sampled. What comes
between them (tool results, a user's reply) is rendered through the chat template *as the
continuation of a conversation* and only that new text is tokenised: the template's own turn
delimiters are kept (ChatML's ``<|im_end|>\\n<|im_start|>tool\\n``), and nothing already in the
episode is decoded and encoded again. Re-tokenising a decoded transcript can merge or split
tokens at the turn boundaries, so the learner would train on ids the sampler never produced:
the best-known multi-turn RL bug in the peers' trackers.

The continuation is found by rendering a stand-in conversation twice, with and without the new
messages, after an assistant turn whose text is a sentinel: the rendered text after the
sentinel is what the template puts between the model's turn and its next one. When the model
ended its turn with EOS, an EOS the template would also write there is not written twice; when
the turn ran out of tokens, the template's end-of-turn text closes it (as context, not trained).
"""

from __future__ import annotations

from typing import Any

from dist_ft.envs.base import Message, Tool
from dist_ft.envs.tools import template_renders_tools, with_instructions

_SENTINEL = "\x00dist_ft-turn\x00"
_STAND_IN: list[Message] = [
    {"role": "user", "content": "."},  # templates that require user/assistant alternation
    {"role": "assistant", "content": _SENTINEL},
]


class ChatCodec:
    """Encodes an episode's environment messages with ``tokenizer``'s chat template."""

    def __init__(self, tokenizer: Any, tools: list[Tool]) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "env.name needs a tokenizer with a chat template (a multi-turn episode is a "
                f"conversation); {getattr(tokenizer, 'name_or_path', 'this model')} has none"
            )
        self.tokenizer = tokenizer
        self.tools = tools
        self.native_tools = bool(tools) and template_renders_tools(tokenizer.chat_template)
        self.eos_text = tokenizer.eos_token or ""
        # the stand-in conversation through its sentinel: every between() renders it first
        before = self._render(_STAND_IN, generation_prompt=False)
        self._stand_in = before[: before.index(_SENTINEL) + len(_SENTINEL)]

    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        kwargs: dict[str, Any] = {}
        if self.native_tools:
            kwargs["tools"] = [t.schema() for t in self.tools]
        text: str = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False, **kwargs
        )
        return text

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def prompt(self, messages: list[Message]) -> list[int]:
        """The episode's prompt: ``reset()``'s messages and the generation prompt. Tools the
        template cannot render are described in a system message of their own (the first)."""
        if self.tools and not self.native_tools:
            messages = with_instructions(messages, self.tools)
        return self._encode(self._render(messages, generation_prompt=True))

    def between(self, messages: list[Message], ended_with_eos: bool) -> list[int]:
        """Ids to append after a model turn: the template's end of that turn, ``messages``, and
        the generation prompt of the next turn."""
        after = self._render([*_STAND_IN, *messages], generation_prompt=True)
        if not after.startswith(self._stand_in):
            raise ValueError("the chat template renders a conversation's start differently")
        text = after[len(self._stand_in) :]
        if ended_with_eos and self.eos_text and text.startswith(self.eos_text):
            text = text[len(self.eos_text) :]  # the model wrote it: it is in the episode
        return self._encode(text)
