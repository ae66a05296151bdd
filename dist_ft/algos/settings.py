"""The settings of each objective's loss, without torch: the config's ``grpo:`` and ``dpo:``
sections hold these types, and the losses in ``grpo.py`` and ``dpo.py`` take them."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Literal

from dist_ft.ranges import Range


class LossType(str, enum.Enum):
    GRPO = "grpo"  # token mean per sequence, then mean over sequences (DeepSeekMath)
    DR_GRPO = "dr_grpo"  # token sum over a constant N x max_tokens: no length bias (Dr.GRPO)
    DAPO = "dapo"  # token sum over all tokens of the batch, clip-higher (DAPO)
    GSPO = "gspo"  # one length-normalised importance ratio per sequence (GSPO)


@dataclass(frozen=True)
class LossParams:
    loss_type: LossType = LossType.GRPO
    """The GRPO loss variant (LossType)."""
    eps_low: float = 0.2
    """Clip range below 1 of the importance ratio."""
    eps_high: float = 0.2
    """Clip range above 1 (DAPO's clip-higher raises it)."""
    beta: float = 0.0
    """KL coefficient; 0 disables the KL term"""
    max_tokens: int = 1
    """Dr.GRPO's constant: the completion budget (rollout.max_new_tokens)"""
    behaviour: Literal["engine", "learner"] = "engine"
    """Whose logprobs of the sampled tokens the importance ratio divides by: the rollout
    engine's, or the learner's own before its update (algo.behaviour_logprobs)."""
    tis_cap: float | None = None
    """Truncated importance sampling (algo.tis_cap): with behaviour "engine", the ratio is taken
    against the learner and each token weighed by min(pi_learner / pi_engine, tis_cap)."""


class DPOLoss(str, enum.Enum):
    # -log sigmoid(beta * h), h = chosen log-ratio - rejected log-ratio (Rafailov et al. 2023);
    # label_smoothing > 0 makes it conservative DPO (cDPO)
    SIGMOID = "sigmoid"
    # (h_tok - 1 / (2 beta))^2, h_tok from per-token mean log-ratios (Azar et al. 2023, Eq. 17,
    # with TRL's length normalisation: see dpo_loss)
    IPO = "ipo"
    # -log sigmoid(beta * (mean logp_w - mean logp_l) - gamma): per-token mean logprobs, no
    # reference model (Meng et al. 2024)
    SIMPO = "simpo"


@dataclass(frozen=True)
class DPOParams:
    """Knobs of :func:`dpo_loss`.

    ``beta``: for SIGMOID and IPO, the strength of the pull towards the reference (IPO's tau);
    TRL's default 0.1. For SIMPO, the scale of the reward beta * mean logprob, which has no
    reference to stay near: the SimPO paper tunes it to 2-10, so 0.1 is far too small there.
    ``label_smoothing``: the assumed probability that a pair's label is flipped (conservative
    DPO, the formula of older TRL's sigmoid loss; TRL 1.16's "sigmoid" ignores it, its "aot"
    and CPO/SimPO losses keep it); SIGMOID and SIMPO only. ``simpo_gamma``: SimPO's target
    reward margin, in reward units (the paper's gamma, TRL's ``CPOConfig.simpo_gamma``); SIMPO
    only.
    """

    loss: DPOLoss = DPOLoss.SIGMOID
    """sigmoid (DPO), ipo, or simpo (no reference model)."""
    beta: Annotated[float, Range(gt=0)] = 0.1
    """Strength of the pull towards the reference (SimPO: reward scale; see the class docstring)."""
    label_smoothing: Annotated[float, Range(ge=0, lt=0.5)] = 0.0
    """Assumed probability that a pair's label is flipped (conservative DPO); sigmoid and simpo
    only."""
    simpo_gamma: Annotated[float, Range()] = 0.5
    """SimPO's target reward margin, in reward units; simpo only."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        # At 0.5 the label carries no information and the loss no longer prefers chosen.
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.loss is DPOLoss.IPO and self.label_smoothing:
            raise ValueError("IPO has no label smoothing: its squared loss has no flipped label")
