"""Multi-turn episodes: the environments of a rollout's prompts, driven turn by turn.

Each prompt gets G episodes, each with its own environment built from the prompt's row. All
live episodes take their next model turn together, in one ``Generator.sample`` call, so a
worker's batch stays as wide as its live episodes; an episode that ends drops out and the rest
go on (``group_ids`` tells the samples apart, not their order).

The token rule (``envs/chat.py``): an episode is one list of ids after its prompt. The ids the
policy sampled go in as sampled, TRAINED, with their behaviour logprobs; what the environment
answers is tokenised once and appended, CONTEXT, logprob 0. An episode ends when its
environment says done, after ``max_turns`` model turns, or when the next turn would not fit in
``max_episode_tokens`` (truncated, recorded).

Tool calls (``envs/tools.py``): when the environment has ``tools`` and the model's turn calls
any, the worker runs them and answers with their results (role ``tool``) instead of calling
``step``; a malformed call is answered with what was wrong. Every call into user code
(building the environment, ``reset``, ``step``, a tool) runs under ``timeout_s``; one that raises
or hangs ends its episode with an error, which the rollout worker treats as a reward error
(``reward.on_error``: mask, zero or abort).

Shapes: B prompts, G episodes each, N = B x G, P prompt tokens, T episode tokens.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from dist_ft.envs import resolve_env
from dist_ft.envs.base import Message, Step, Tool
from dist_ft.envs.chat import ChatCodec
from dist_ft.envs.tools import BadCall, parse_calls
from dist_ft.rewards import call_with_deadline
from dist_ft.rollout.base import Generation, SampledTurn
from dist_ft.wire.batch import Span
from dist_ft.wire.packing import left_pad
from dist_ft.wire.prompt import Prompt

ENV_REWARD = "env"  # the reward column of the environment's return


@dataclass(frozen=True)
class EnvSpec:
    """What a rollout worker runs its episodes with (``env.*`` of the config)."""

    name: str  # a name in dist_ft.envs.ENVIRONMENTS, or "package.module:Class"
    kwargs: dict[str, Any]
    max_turns: int  # model turns
    max_episode_tokens: int  # every token after the prompt: the model's and the environment's
    timeout_s: float  # per call into the environment or a tool


@dataclass
class Episode:
    group: int  # the prompt it belongs to
    env: Any = None
    ids: list[int] = field(default_factory=list)  # [T] after the prompt
    spans: list[int] = field(default_factory=list)  # [T] Span codes
    logprobs: list[float] = field(default_factory=list)  # [T], 0 off TRAINED
    turns: int = 0  # model turns
    reward: float = 0.0  # the sum of the environment's turn rewards
    done: bool = False
    truncated: bool = False
    error: str | None = None  # why a call into the environment failed; the episode ended there
    error_kind: str = ""  # the error without what changes from call to call: printed once
    tool_calls: int = 0
    bad_tool_calls: int = 0
    info: dict[str, float] = field(default_factory=dict)  # Step.info's numbers, summed
    tool_map: dict[str, Tool] = field(default_factory=dict)  # the environment's tools by name
    codec: ChatCodec | None = None  # its messages -> ids (its tools change the prompt)

    def append(self, ids: list[int], span: Span, logprobs: list[float] | None = None) -> None:
        self.ids += ids
        self.spans += [int(span)] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


def episode_counters(episodes: list[Episode]) -> dict[str, float]:
    """A rollout's episode figures, summed (``ScoredBatch.counters`` sums them over workers):
    episodes, model turns, truncated ones, errors, tool calls (well-formed and not), and the
    numbers of every ``Step.info``."""
    counters = {
        "env/episodes": float(len(episodes)),
        "env/turns": float(sum(e.turns for e in episodes)),
        "env/truncated": float(sum(e.truncated for e in episodes)),
        "env/errors": float(sum(e.error is not None for e in episodes)),
        "env/tool_calls": float(sum(e.tool_calls for e in episodes)),
        "env/bad_tool_calls": float(sum(e.bad_tool_calls for e in episodes)),
    }
    for e in episodes:
        for key, value in e.info.items():
            counters[f"env/{key}"] = counters.get(f"env/{key}", 0.0) + value
    return counters


class EpisodeRunner:
    """Runs the episodes of a rollout with ``generator`` (which needs ``tokenizer`` and
    ``sample``: ``rollout/base.py``)."""

    def __init__(self, spec: EnvSpec, generator: Any, max_new_tokens: int, need_ref: bool) -> None:
        """``max_new_tokens``: a model turn's budget (``rollout.max_new_tokens``); ``need_ref``:
        the KL term is on, so the episodes get the reference policy's logprobs."""
        missing = [m for m in ("tokenizer", "sample") if getattr(generator, m, None) is None]
        if missing:
            raise TypeError(
                f"env.name needs a generator that runs token-level turns; "
                f"{type(generator).__name__} has no {', '.join(missing)}"
            )
        self.spec = spec
        self.env_cls = resolve_env(spec.name)
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.max_new_tokens = max_new_tokens
        self.need_ref = need_ref

    def _call(self, episode: Episode, what: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` under the timeout; on an error the episode ends with it, and None."""
        try:
            return call_with_deadline(fn, args, self.spec.timeout_s)
        except Exception as e:
            episode.error = f"env {self.spec.name}: {what} {type(e).__name__}: {e}"
            episode.error_kind = f"{what} {type(e).__name__}"
            episode.done = True
            return None

    def run(self, prompts: list[Prompt], n: int) -> tuple[Generation, list[Episode]]:
        """``n`` episodes for each prompt; the Generation holds them in the order they were
        started (group by group)."""
        episodes, prompt_rows = self._start(prompts, n)
        try:
            live = [e for e in episodes if not e.done]
            while live:
                contexts = [prompt_rows[e.group] + e.ids for e in live]
                room = [self.spec.max_episode_tokens - len(e.ids) for e in live]
                budgets = [min(self.max_new_tokens, r) for r in room]
                for episode, turn in zip(
                    live, self.generator.sample(contexts, budgets), strict=True
                ):
                    self._take(episode, turn)
                live = [e for e in live if not e.done]
        finally:
            for episode in episodes:
                self._close(episode)
        return self._generation(prompt_rows, episodes), episodes

    def _take(self, episode: Episode, turn: SampledTurn) -> None:
        """Append a model turn as sampled, then the environment's answer (or end the episode)."""
        episode.append(turn.ids, Span.TRAINED, turn.logprobs)
        episode.turns += 1
        text = self.tokenizer.decode(turn.ids, skip_special_tokens=True)
        reply = self._answer(episode, text)
        if reply is None or reply.done:
            episode.done = True
            return
        ended = bool(turn.ids) and turn.ids[-1] == self.tokenizer.eos_token_id
        assert episode.codec is not None  # set with the environment
        between = self._call(
            episode, "step's messages", episode.codec.between, reply.messages, ended
        )
        if between is None:
            return
        room = self.spec.max_episode_tokens - len(episode.ids) - len(between)
        if episode.turns >= self.spec.max_turns or room < 1:
            episode.truncated = episode.done = True  # no room for another model turn
            return
        episode.append(between, Span.CONTEXT)

    def _start(self, prompts: list[Prompt], n: int) -> tuple[list[Episode], list[list[int]]]:
        """Build and reset every episode's environment; each prompt's token row is its first
        episode's rendered ``reset()`` (the others must render the same)."""
        episodes, prompt_rows = [], []
        for b, prompt in enumerate(prompts):
            row: list[int] | None = None
            for _ in range(n):
                episode = Episode(group=b)
                episodes.append(episode)
                row_data = prompt.row if prompt.row is not None else {"prompt": prompt.text}
                episode.env = self._call(episode, "construction raised", self._build, row_data)
                if episode.done:
                    continue
                tools: list[Tool] = list(getattr(episode.env, "tools", None) or [])
                episode.tool_map = {t.name: t for t in tools}
                episode.codec = ChatCodec(self.tokenizer, tools)
                messages = self._call(episode, "reset raised", episode.env.reset)
                if episode.done:
                    continue
                ids = self._call(episode, "reset's messages", episode.codec.prompt, messages)
                if episode.done:
                    continue
                if row is None:
                    row = ids
                elif ids != row:
                    episode.error = (
                        f"env {self.spec.name}: reset() of row {prompt.index} gave its episodes "
                        "different first messages; a group needs one prompt"
                    )
                    episode.error_kind, episode.done = "reset differs", True
            # every reset failed: the data's own rendering stands in, so the group keeps a row
            prompt_rows.append(row if row is not None else self._encode(prompt.text))
        return episodes, prompt_rows

    def _close(self, episode: Episode) -> None:
        """The environment's optional ``close()``; a failure there costs the episode nothing
        (its reward is in) but is said on stderr."""
        close = getattr(episode.env, "close", None)
        if callable(close):
            try:
                call_with_deadline(close, (), self.spec.timeout_s)
            except Exception as e:
                print(f"env {self.spec.name}: close() {type(e).__name__}: {e}", file=sys.stderr)

    def _build(self, row: dict[str, Any]) -> Any:
        return self.env_cls(row, **self.spec.kwargs)

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def _answer(self, episode: Episode, text: str) -> Step | None:
        """What comes back to the model's turn ``text``: its tool calls' results, or the
        environment's ``step``. None when a call failed (the episode ended with its error)."""
        calls = parse_calls(text, episode.tool_map) if episode.tool_map else []
        if not calls:
            step = self._call(episode, "step raised", episode.env.step, text)
            if step is None:
                return None
            if not isinstance(step, Step):
                episode.error = f"env {self.spec.name}: step returned {type(step).__name__}"
                episode.error_kind, episode.done = "step returned", True
                return None
            episode.reward += float(step.reward)
            for key, value in step.info.items():
                if isinstance(value, int | float):
                    episode.info[key] = episode.info.get(key, 0.0) + float(value)
            return step
        results: list[Message] = []
        for call in calls:
            if isinstance(call, BadCall):
                episode.bad_tool_calls += 1
                results.append({"role": "tool", "content": call.reason})
                continue
            episode.tool_calls += 1
            run = functools.partial(call.tool.fn, **call.arguments)
            out = self._call(episode, f"tool {call.tool.name} raised", run)
            if episode.done:
                return None
            results.append({"role": "tool", "name": call.tool.name, "content": str(out)})
        return Step(messages=results)

    def _generation(self, prompt_rows: list[list[int]], episodes: list[Episode]) -> Generation:
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad(prompt_rows, pad)
        # right-padded [N, T]; an episode that failed before its first turn is all padding
        ids_NT, spans_NT, logprobs_NT = (
            pad_sequence([torch.tensor(getattr(e, f), dtype=dtype) for e in episodes], True, value)
            for f, dtype, value in (
                ("ids", torch.long, pad),
                ("spans", torch.int8, int(Span.PAD)),
                ("logprobs", torch.float32, 0.0),
            )
        )
        group_ids = torch.tensor([e.group for e in episodes], dtype=torch.long)
        ref_logprobs = None
        if self.need_ref:
            ref_logprobs = self.generator.reference_logprobs(
                prompt_ids,
                prompt_mask,
                group_ids,
                ids_NT,
                spans_NT != Span.PAD,
                spans_NT == Span.TRAINED,
            ).cpu()
        return Generation(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            group_ids=group_ids,
            episode_ids=ids_NT,
            episode_mask=spans_NT,
            logprobs=logprobs_NT,
            ref_logprobs=ref_logprobs,
            texts=[self.tokenizer.decode(e.ids, skip_special_tokens=True) for e in episodes],
        )
