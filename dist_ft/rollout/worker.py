"""``RolloutWorker``: asks its generator for G episodes per prompt, scores them, computes
group-relative advantages (groups named by the generator's group ids, never by row order) and
returns a ``ScoredBatch``. A plain class: ``cluster/ray.py`` wraps it as a Ray actor,
``cluster/local.py`` calls it in-process in debug mode.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from dist_ft.algos.advantages import advantage_fn
from dist_ft.algos.common import group_slots
from dist_ft.algos.grpo import advantages_by_group
from dist_ft.extensions import import_named
from dist_ft.rewards import RewardError, RewardScores, RewardSet
from dist_ft.rollout.base import GENERATORS, Generator, GeneratorSpec
from dist_ft.rollout.episodes import (
    ENV_REWARD,
    EnvSpec,
    Episode,
    EpisodeRunner,
    episode_counters,
)
from dist_ft.sync import Published, WeightTransport, fingerprint
from dist_ft.wire.batch import ScoredBatch
from dist_ft.wire.prompt import Prompt


class GeneratorError(ValueError):
    """``rollout.generator`` names no usable engine; the message says which and what to fix."""


# The Generator protocol's methods every engine needs; use_adapter only under peft.adapters,
# export_weights only for read-back (an engine without it is checked by the bytes that arrive)
_PROTOCOL = ("generate", "load_weights")


def resolve_generator(name: str, adapters: bool = False) -> type:
    """The engine class ``rollout.generator`` names: a built-in (``GENERATORS``), or a user's
    ``package.module:Class`` that imports and has the :class:`Generator` methods (with
    ``adapters``, ``use_adapter`` too). Cheap for a user's class: the CLI checks it before any
    model loads."""
    if name in GENERATORS:
        module_name, _, cls_name = GENERATORS[name].partition(":")
        builtin: type = getattr(importlib.import_module(module_name), cls_name)
        return builtin
    cls = import_named(
        name, "rollout.generator", GeneratorError, GENERATORS, "package.module:Class"
    )
    module_name, _, cls_name = name.partition(":")
    if not isinstance(cls, type):
        what = "nothing" if cls is None else f"a {type(cls).__name__}"
        raise GeneratorError(
            f"rollout.generator={name}: {module_name}.{cls_name} is {what}, not a class"
        )
    needed = (*_PROTOCOL, "use_adapter") if adapters else _PROTOCOL
    missing = [m for m in needed if not callable(getattr(cls, m, None))]
    if missing:
        why = " (peft.adapters switches adapters)" if missing == ["use_adapter"] else ""
        raise GeneratorError(
            f"rollout.generator={name}: {cls_name} is not a dist_ft.rollout.Generator: it has "
            f"no {', '.join(missing)}{why}"
        )
    return cls


def make_generator(name: str, spec: GeneratorSpec) -> Generator:
    """A built-in engine by name (``GENERATORS``), or a user's ``package.module:Class``."""
    cls = resolve_generator(name, bool(spec.peft.adapters))
    if name in GENERATORS:  # dist_ft's own: an error here is a bug, traceback kept
        return cls(spec)
    try:
        return cls(spec)
    except Exception as e:  # a user's engine refusing its spec, e.g. a device it lacks
        raise GeneratorError(
            f"rollout.generator={name}: {cls.__name__}(spec) raised {type(e).__name__}: {e}"
        ) from None


@dataclass(frozen=True)
class RolloutSpec:
    """Everything a rollout worker is built from (its index and judge come separately)."""

    generation: GeneratorSpec
    generator: str  # a name in GENERATORS, or "package.module:Class"
    group_size: int  # G
    rewards: list[tuple[str, float, dict[str, Any]]]  # (name or module:function, weight, kwargs)
    reward_tasks: list[list[str]]  # [K] the tasks each reward function scores; [] = every task
    reward_timeout_s: float
    on_reward_error: Literal["mask", "zero", "abort"]  # reward.on_error (see RewardConfig)
    scale_rewards: bool  # divide advantages by the group's std
    advantage: str  # the estimator's name in algos/advantages.py's ADVANTAGES
    seed: int
    deterministic: bool = False
    env: EnvSpec | None = None  # multi-turn episodes (rollout/episodes.py); None: single-turn


class RolloutWorker:
    def __init__(self, spec: RolloutSpec, worker_index: int = 0, judge: Any = None) -> None:
        """``judge``: an RLAIF judge (``JudgeWorker``, or a handle to one on Ray) that the
        reward function named ``judge`` calls through ``score_with_stats``."""
        torch.use_deterministic_algorithms(spec.deterministic)
        self.deterministic = spec.deterministic
        # Each worker samples its own stream: one seed on every worker would duplicate groups.
        torch.manual_seed(spec.seed * 1000 + worker_index)
        self.generator = make_generator(spec.generator, spec.generation)
        self.group_size = spec.group_size
        self.scale_rewards = spec.scale_rewards
        self.advantages = advantage_fn(spec.advantage)
        self.judge = judge
        self._counters: dict[str, float] = {}
        self._group_ids: list[int] = []  # of each sample the judge scores in this rollout
        self._env_returns: list[float] = []  # of each episode of this rollout, in sample order
        self._env_errors_printed: set[str] = set()
        extra = {"judge": self._judge_reward} if judge is not None else {}
        self.episodes = None
        if spec.env is not None:
            gen = spec.generation
            self.episodes = EpisodeRunner(
                spec.env, self.generator, gen.max_new_tokens, gen.need_ref_logprobs
            )
            extra[ENV_REWARD] = self._env_reward
        self.rewards = RewardSet(
            spec.rewards, timeout_s=spec.reward_timeout_s, extra=extra, tasks=spec.reward_tasks
        )
        self.on_reward_error = spec.on_reward_error
        self.worker_index = worker_index
        self.version = 0
        # peft.adapters: task -> (adapter's place, name); a rollout's prompts use one adapter
        adapters = spec.generation.peft.adapters
        self.adapter_of = {t: (i, a) for i, (a, ts) in enumerate(adapters.items()) for t in ts}

    def close(self) -> None:
        """Stop what the engine runs beside this process (the vLLM engine's child), if any."""
        close = getattr(self.generator, "close", None)
        if callable(close):
            close()

    # ------------------------------------------------------------------ weights
    def set_weights(self, update: Published, transport: WeightTransport, read_back: bool) -> str:
        """Receive ``update`` through ``transport`` and load it as policy ``update.version``.

        Returns the fingerprint of the bytes received, or with ``read_back`` of the weights
        re-exported from the generator after loading (a load that converts or drops anything
        shows up there; an engine that cannot re-export, see ``reads_back``, returns the bytes'
        print). Bytes that arrived damaged are not loaded; the caller's check fails.
        """
        tensors = transport.receive(update)
        received = fingerprint(tensors)
        if received != update.fingerprint:
            return received
        self.generator.load_weights(tensors)
        self.version = update.version
        return self.fingerprint(tensors.keys()) if read_back and self.reads_back else received

    @property
    def reads_back(self) -> bool:
        """Whether the engine can re-export what it holds (``Generator.export_weights``)."""
        return callable(getattr(self.generator, "export_weights", None))

    def fingerprint(self, names: Iterable[str] | None = None) -> str:
        """Of the weights the generator holds. ``names``: a sync's tensor names; under
        ``peft.adapters`` a sync carries the adapters that changed (``"<adapter>/..."``), and
        the read-back re-exports those adapters, whole."""
        held = self.generator.export_weights()
        if names is not None and self.adapter_of:
            sent = {n.partition("/")[0] for n in names}
            held = {k: v for k, v in held.items() if k.partition("/")[0] in sent}
        return fingerprint(held)

    # ------------------------------------------------------------------ rollout
    def rollout(self, step: int, prompts: list[Prompt], seed: int) -> ScoredBatch:
        """G episodes for each of the B prompts, scored, with group-relative advantages.

        In deterministic mode sampling is seeded by ``seed`` alone (the caller derives it from
        run seed, step and share), so a share issued again after a worker died draws the same
        completions on any worker holding the same weights. Otherwise the worker's own stream
        continues (checkpoints save it).
        """
        t0 = time.perf_counter()
        if self.deterministic:
            torch.manual_seed(seed)
        adapter = self._use_adapter(prompts)
        episodes: list[Episode] = []
        if self.episodes is not None:
            gen, episodes = self.episodes.run(prompts, self.group_size)
            self._env_returns = [e.reward for e in episodes]
        else:
            gen = self.generator.generate([p.text for p in prompts], self.group_size)
        group_N = gen.group_ids.cpu()
        n = len(group_N)

        prompt_texts = [prompts[i].text for i in group_N.tolist()]
        answers = [prompts[i].answer for i in group_N.tolist()]
        tasks = [prompts[i].task for i in group_N.tolist()]
        self._counters = {}
        if "judge" in self.rewards.names:  # it is called with the samples of its tasks only
            judged_N = self.rewards.applies(tasks)[:, self.rewards.names.index("judge")]
            self._group_ids = group_N[judged_N].tolist()
        scores = self.rewards.score(prompt_texts, gen.texts, answers, tasks)
        if episodes:
            self._env_failures(episodes, scores)
            self._counters.update(episode_counters(episodes))
        errors_N = scores.errors_NK.any(1)
        if errors_N.any() and self.on_reward_error == "abort":
            raise RewardError(f"step {step}: " + "; ".join(scores.messages.values()))
        # "zero" scores a failed function 0; "mask" leaves the sample out of its group's
        # statistics and of the loss. Either way no NaN reaches the advantages.
        total_N = scores.total(self.rewards.weights, fill=0.0)
        valid_N = ~errors_N if self.on_reward_error == "mask" else torch.ones_like(errors_N)
        adv_N = advantages_by_group(
            total_N, group_N, self.scale_rewards, valid_N, estimator=self.advantages
        )

        # (step, prompt's dataset row, place in its group): a share issued again gets the same ids.
        prompt_index_N = torch.tensor([p.index for p in prompts], dtype=torch.int32)[group_N]
        sample_ids = torch.stack(
            [torch.full((n,), step, dtype=torch.int32), prompt_index_N, group_slots(group_N).int()],
            dim=1,
        )
        return ScoredBatch(
            prompt_ids=gen.prompt_ids.to("cpu", torch.int32),
            prompt_mask=gen.prompt_mask.to("cpu", torch.bool),
            group_ids=group_N.to(torch.int32),
            episode_ids=gen.episode_ids.to("cpu", torch.int32),
            episode_mask=gen.episode_mask.to("cpu", torch.int8),
            logprobs=gen.logprobs.cpu(),
            ref_logprobs=None if gen.ref_logprobs is None else gen.ref_logprobs.cpu(),
            rewards=scores.rewards_NK,
            reward_total=total_N,
            reward_errors=scores.errors_NK,
            valid=valid_N,
            advantages=adv_N.float(),
            sample_ids=sample_ids,
            versions=torch.full((n,), self.version, dtype=torch.int32),
            adapter_ids=None if adapter is None else torch.full((n,), adapter, dtype=torch.int8),
            reward_names=list(self.rewards.names),
            worker_stats={self.worker_index: (n, time.perf_counter() - t0)},
            counters=self._counters,
            reward_messages=scores.messages,
        )

    def _use_adapter(self, prompts: list[Prompt]) -> int | None:
        """Under ``peft.adapters``: switch the generator to the adapter of the prompts' tasks
        (the trainer issues one adapter's prompts per step) and return its place."""
        if not self.adapter_of:
            return None
        used = {self.adapter_of[p.task] for p in prompts}
        if len(used) != 1:
            names = sorted(a for _, a in used)
            raise ValueError(f"one rollout's prompts belong to adapters {names}: issue each alone")
        ((index, name),) = used
        self.generator.use_adapter(name)
        return index

    def _env_reward(self, prompts: list[str], completions: list[str], answers: list) -> list[float]:
        return list(self._env_returns)  # every sample is scored (the column has no tasks)

    def _env_failures(self, episodes: list[Episode], scores: RewardScores) -> None:
        """An episode whose environment failed is a failed entry of the env reward column, so
        ``reward.on_error`` applies to it as to any reward error; each kind printed once."""
        k = self.rewards.names.index(ENV_REWARD)
        for i, episode in enumerate(episodes):
            if episode.error is None:
                continue
            scores.rewards_NK[i, k] = float("nan")
            scores.errors_NK[i, k] = True
            scores.messages.setdefault(ENV_REWARD, episode.error)
            if episode.error_kind not in self._env_errors_printed:
                self._env_errors_printed.add(episode.error_kind)
                print(
                    f"env error: {episode.error} [printed once; every failure is counted in "
                    "env/errors]",
                    file=sys.stderr,
                    flush=True,
                )

    def _judge_reward(
        self, prompts: list[str], completions: list[str], answers: list[str | None]
    ) -> list[float]:
        # The judge's group mode compares the samples sharing a group id, not G adjacent rows.
        scores, stats = self.judge.score_with_stats(prompts, completions, self._group_ids)
        self._counters = {f"judge/{k}": float(v) for k, v in stats.items()}
        return scores
