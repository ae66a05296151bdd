"""Several adapters on one base (``peft.adapters``): which prompts each step draws, and which
warm-up rows each adapter trains on. The adapters themselves are peft's (``model/peft.py``); the
learner steps one at a time (``Learner.step``), the workers generate with it
(``RolloutWorker.rollout``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dist_ft.config import Config, ConfigError
from dist_ft.data import PreparedPrompts, PromptSampler, load_rows, prepare_prompts
from dist_ft.tasks import DEFAULT_TASK
from dist_ft.wire.prompt import Prompt

if TYPE_CHECKING:
    from dist_ft.config import Config


class AdapterSampler:
    """Prompts for several adapters (``peft.adapters``), one adapter a step, in turn: the i-th
    call draws from ``groups[i mod n]`` (the prompt indices of that adapter's tasks), each
    group with its own shuffled epochs. A checkpoint restores the turn with the cursors."""

    def __init__(self, groups: list[list[int]], seed: int) -> None:
        self.groups = groups
        self.samplers = [PromptSampler(len(g), seed + i) for i, g in enumerate(groups)]
        self.turn = 0

    def next(self, k: int) -> list[int]:
        i = self.turn % len(self.groups)
        self.turn += 1
        return [self.groups[i][j] for j in self.samplers[i].next(k)]

    def state_dict(self) -> dict[str, Any]:
        return {"turn": self.turn, "samplers": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.turn = state["turn"]
        for sampler, s in zip(self.samplers, state["samplers"], strict=True):
            sampler.load_state_dict(s)


def make_sampler(cfg: Config, prompts: list[Prompt]) -> PromptSampler | AdapterSampler:
    """The prompts of each step. Under ``peft.adapters``, one adapter's prompts a step, the
    adapters in turn; its tasks and the data's must match exactly (checked before any model
    loads: a task without adapter would never train, an adapter without task never move)."""
    if not cfg.peft.adapters:
        return PromptSampler(len(prompts), cfg.run.seed)
    data_tasks = {p.task for p in prompts}
    owned = {t for tasks in cfg.peft.adapters.values() for t in tasks}
    keys = ("peft.adapters", "data.source")
    if orphans := sorted(data_tasks - owned):
        raise ConfigError(
            f"{cfg.data.source}: tasks {orphans} belong to no adapter of peft.adapters "
            f"({dict(cfg.peft.adapters)}); name each task in one adapter",
            keys=keys,
        )
    for name, tasks in cfg.peft.adapters.items():
        if absent := sorted(set(tasks) - data_tasks):
            raise ConfigError(
                f"peft.adapters.{name} names tasks {absent} that {cfg.data.source} does not "
                f"have (its tasks: {sorted(data_tasks)})",
                keys=keys,
            )
    groups = [
        [i for i, p in enumerate(prompts) if p.task in tasks]
        for tasks in cfg.peft.adapters.values()
    ]
    return AdapterSampler(groups, cfg.run.seed)


def adapter_rows(
    cfg: Config, rows: list[dict[str, str]]
) -> list[tuple[int | None, list[dict[str, str]]]]:
    """Warm-up rows split by the adapter of their task (``peft.adapters``); all together,
    adapter None, without."""
    if not cfg.peft.adapters:
        return [(None, rows)]
    parts: list[tuple[int | None, list[dict[str, str]]]] = []
    for index, tasks in enumerate(cfg.peft.adapters.values()):
        if mine := [r for r in rows if r.get("task", DEFAULT_TASK) in tasks]:
            parts.append((index, mine))
    return parts


def load_prompts(cfg: Config, tokenizer: Any) -> PreparedPrompts:
    """``data.*``'s rows, validated and rendered (bad rows raise or are returned as rejects)."""
    d = cfg.data
    return prepare_prompts(
        load_rows(d.source, d.demo_size, cfg.run.seed),
        tokenizer,
        source=d.source,
        prompt_field=d.prompt_field,
        answer_field=d.answer_field,
        template=d.template,
        plain_template=d.plain_template,
        max_prompt_tokens=d.max_prompt_tokens,
        on_bad_row=d.on_bad_row,
        task_field=d.task_field,
        keep_rows=cfg.env.name is not None,
    )
