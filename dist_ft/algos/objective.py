"""What a learner step optimises: one small class per objective, and the registry that names it.

An objective is one class (a subclass of :class:`Objective`, next to its pure loss in
``algos/``) plus one line in :data:`OBJECTIVES`. The registry line also says what the config
needs to know without importing torch: how many rows one prompt gives and whether a group's
rows must stay together (a DPO pair). The learner resolves the class by name and calls it the
same way for every objective (``Learner.step(batch, objective)``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dist_ft.algos.settings import DPOParams, LossParams

if TYPE_CHECKING:
    import torch

    from dist_ft.wire.batch import ScoredBatch

# (batch, temperature) -> [N, W] logprobs of batch.episode_ids[:, :W] under the policy, with
# grad; W is the batch's trimmed width (its longest episode). The learner supplies it.
PolicyLogprobs = Callable[["ScoredBatch", float], "torch.Tensor"]


@dataclass(frozen=True)
class ObjectiveSettings:
    """What an objective's loss may read: GRPO's loss variant, DPO's, and the sampling
    temperature (GRPO recomputes logprobs at it). A new objective reads what it needs."""

    loss: LossParams = field(default_factory=LossParams)
    dpo: DPOParams = field(default_factory=DPOParams)
    temperature: float = 1.0


class Objective:
    """One objective's loss, as the learner runs it over a step's micro-batches.

    ``count`` is additive (the learner group sums its ranks' counts), ``normaliser`` turns the
    sum into the step's denominator, and ``loss`` is a micro-batch's share of the step's loss
    over that denominator, so 2 ranks x 2 micro-batches equal one process on the whole batch.
    """

    packs = True  # the forward may pack rows (exact to float error, no padding compute)

    def __init__(self, settings: ObjectiveSettings) -> None:
        self.settings = settings

    def count(self, batch: ScoredBatch) -> float:
        """This rank's share of the step's loss denominator (sequences, tokens, pairs...)."""
        raise NotImplementedError

    def normaliser(self, total: float) -> float:
        """The step's denominator from the ranks' summed counts."""
        return max(1.0, total)

    def loss(
        self, logprobs: PolicyLogprobs, batch: ScoredBatch, normaliser: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """A micro-batch's share of the step's loss (with grad), and metrics to average."""
        raise NotImplementedError


@dataclass(frozen=True)
class Registered:
    """An objective as the registry holds it: where its class is, and the two facts about its
    batches that the config checks at load (without torch)."""

    target: str  # "package.module:Class", an Objective subclass
    rows_per_prompt: int | None  # rows one prompt gives; None: rollout.group_size (sampled)
    whole_groups: bool = False  # the loss couples a group's rows: never split one


OBJECTIVES: dict[str, Registered] = {
    "grpo": Registered("dist_ft.algos.grpo:GRPO", None),  # clipped policy loss (LossType)
    "sft": Registered("dist_ft.algos.sft:SFT", 1),  # NLL of the trained tokens
    # preference pairs (DPOLoss): each group is one pair, its first row the chosen answer and
    # its second the rejected one; reference logprobs come in the batch
    "dpo": Registered("dist_ft.algos.dpo:DPO", 2, whole_groups=True),
}


def objective_class(name: str) -> type[Objective]:
    """The registered class of objective ``name`` (KeyError naming the registered ones)."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; registered: {', '.join(OBJECTIVES)}")
    module, _, attr = OBJECTIVES[name].target.partition(":")
    cls: Any = getattr(importlib.import_module(module), attr)
    return cls
