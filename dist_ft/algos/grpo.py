"""GRPO and its variants: group-relative advantages, clipped policy losses, KL estimator.

Shapes: B = prompts, G = completions per prompt, N = B x G samples, T = completion tokens,
Bg = groups in a batch (group ids index them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dist_ft.algos.advantages import AdvantageFn
from dist_ft.algos.common import group_slots, masked_mean
from dist_ft.algos.objective import Objective, PolicyLogprobs

if TYPE_CHECKING:
    from dist_ft.wire.batch import ScoredBatch

from dist_ft.algos.settings import LossParams, LossType


def group_advantages(
    rewards_BG: torch.Tensor,
    scale: bool = True,
    valid_BG: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Advantage of each completion relative to its group: (r - mean_g) / (std_g + eps).

    rewards_BG [B, G]; valid_BG [B, G] bool marks samples whose reward exists. Invalid samples
    neither enter their group's statistics nor get an advantage (0). ``scale=False`` is Dr.GRPO's
    mean-centring only. std is the unbiased sample std, as in DeepSeekMath and TRL; a group with
    fewer than two valid samples has no spread and gets 0. Returns [B, G], always finite.
    """
    if valid_BG is None:
        valid_BG = torch.ones_like(rewards_BG, dtype=torch.bool)
    w = valid_BG.to(torch.float64)
    r = torch.where(valid_BG, rewards_BG.to(torch.float64), torch.zeros((), dtype=torch.float64))
    n = w.sum(-1, keepdim=True)  # [B, 1]
    mean = r.sum(-1, keepdim=True) / n.clamp(min=1)
    centred = (r - mean) * w
    adv = centred
    if scale:
        var = (centred**2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
        adv = centred / (var.sqrt() + eps)
    adv = torch.where(n >= 2, adv, torch.zeros_like(adv))
    return adv.to(rewards_BG.dtype)


def advantages_by_group(
    rewards_N: torch.Tensor,
    group_N: torch.Tensor,
    scale: bool = True,
    valid_N: torch.Tensor | None = None,
    estimator: AdvantageFn | None = None,
) -> torch.Tensor:
    """``estimator`` (default :func:`group_advantages`; see ``algos/advantages.py``) for samples
    named by group id rather than by row order.

    rewards_N [N]; group_N [N] group ids in ``0..Bg-1``; valid_N [N] bool. Samples are packed
    into [Bg, G_max] (a short group's empty slots are invalid, so they enter no statistics) and
    unpacked back to row order. Returns [N].
    """
    if valid_N is None:
        valid_N = torch.ones_like(rewards_N, dtype=torch.bool)
    group, slot = group_N.long(), group_slots(group_N)
    shape = (int(group.max()) + 1, int(slot.max()) + 1) if len(group) else (0, 0)
    rewards_BG = rewards_N.new_zeros(shape)
    valid_BG = torch.zeros(shape, dtype=torch.bool)
    rewards_BG[group, slot] = rewards_N
    valid_BG[group, slot] = valid_N
    estimator = estimator or group_advantages
    return estimator(rewards_BG, scale=scale, valid_BG=valid_BG)[group, slot]


def kl_k3(logp_NT: torch.Tensor, ref_logp_NT: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(d) - d - 1, d = ref - logp.

    Unbiased, always >= 0, and lower variance than log(pi/ref). [N, T].
    """
    d = ref_logp_NT - logp_NT
    return torch.exp(d) - d - 1


def loss_count(mask_NT: torch.Tensor, params: LossParams) -> float:
    """What the loss is averaged over, counted in one batch: sequences in the loss (GRPO, GSPO,
    Dr.GRPO) or tokens (DAPO). Additive, so a learner group sums its ranks' counts."""
    if params.loss_type is LossType.DAPO:
        return float(mask_NT.sum())
    return float((mask_NT.sum(-1) > 0).sum())  # a left-out sequence has no tokens


def normaliser_from_count(count: float, params: LossParams) -> float:
    """The loss denominator for a whole step whose :func:`loss_count` (all ranks) is ``count``.
    Dr.GRPO's is the constant budget, sequences x ``max_tokens``: no length bias."""
    count = max(1.0, count)
    return count * params.max_tokens if params.loss_type is LossType.DR_GRPO else count


def loss_normaliser(mask_NT: torch.Tensor, params: LossParams) -> float:
    """The denominator of the loss for a whole step's batch.

    The learner group computes it once over the full step (all ranks, all micro-batches) and
    passes it to :func:`policy_loss` for every micro-batch, so that gradient accumulation and
    data parallelism give exactly the gradient of the full-batch loss.
    """
    return normaliser_from_count(loss_count(mask_NT, params), params)


def mismatch_stats(
    learner_NT: torch.Tensor, engine_NT: torch.Tensor, mask_NT: torch.Tensor
) -> dict[str, float]:
    """How far the rollout engine's logprobs of the sampled tokens are from the learner's on the
    same tokens (all [N, T]; ``mask_NT`` 1 on the trained ones): the mean and largest
    |log(pi_learner / pi_engine)|, and the k3 estimate of KL(engine || learner) (the tokens were
    drawn from the engine). A weight sync that did not take, or an engine whose kernels or dtype
    differ from the learner's, shows here before it shows in the rewards."""
    mask = mask_NT.to(learner_NT.dtype)
    gap = (learner_NT - engine_NT).abs() * mask
    return {
        "mismatch/mean_abs_log_ratio": float(masked_mean(gap, mask)),
        "mismatch/max_abs_log_ratio": float(gap.max()) if gap.numel() else 0.0,
        # float64: at fp32-level gaps (1e-6) k3 ~ d^2 / 2 is below float32's resolution of 1
        "mismatch/k3": float(masked_mean(kl_k3(engine_NT.double(), learner_NT.double()), mask)),
    }


def check_mismatch(metrics: dict[str, float], limit: float | None, step: int) -> None:
    """The rollout trust check (``algo.max_mismatch``): stop a run whose engine does not sample
    the policy the learner trains."""
    gap = metrics.get("mismatch/mean_abs_log_ratio", 0.0)
    if limit is not None and gap > limit:
        raise MismatchError(
            f"step {step}: the rollout engine's logprobs of its sampled tokens differ from the "
            f"learner's by {gap:.3g} mean |log-ratio| > algo.max_mismatch={limit} (largest "
            f"{metrics['mismatch/max_abs_log_ratio']:.3g}): the engine is not sampling the "
            "policy being trained (a weight sync that did not take, or kernels or a dtype unlike "
            "the learner's). See mismatch/* in metrics.jsonl; algo.tis_cap corrects a small, "
            "steady mismatch"
        )


class MismatchError(RuntimeError):
    """The rollout engine's logprobs left ``algo.max_mismatch``."""


def policy_loss(
    logp_NT: torch.Tensor,
    old_logp_NT: torch.Tensor,
    adv_N: torch.Tensor,
    mask_NT: torch.Tensor,
    params: LossParams,
    ref_logp_NT: torch.Tensor | None = None,
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss (plus beta x KL) for one batch of completions.

    logp_NT [N, T]: current policy, with grad. old_logp_NT [N, T]: the rollout engine's
    logprobs of the tokens it sampled. adv_N [N]. mask_NT [N, T]: 1 on completion tokens.
    ref_logp_NT [N, T] is required when ``params.beta > 0``. ``normaliser`` defaults to this
    batch's own (:func:`loss_normaliser`). Returns the scalar loss and detached statistics.

    The learner takes one optimizer step per batch, so ``logp_NT`` is its policy before the
    update: detached, it is the learner's own behaviour logprobs. The ratio divides by the
    engine's (``params.behaviour == "engine"``) or by those (``"learner"``). With
    ``params.tis_cap`` the ratio is the learner's and each token's surrogate is weighed by
    min(pi_learner / pi_engine, tis_cap) (truncated importance sampling: Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"): the engine sampled the
    tokens, the learner's distribution is what the gradient is for. GSPO weighs each sequence by
    the capped length-normalised ratio, as its own ratio is.
    """
    mask = mask_NT.to(logp_NT.dtype)
    adv = adv_N.to(logp_NT.dtype).unsqueeze(-1)  # [N, 1]
    learner_NT = logp_NT.detach()
    behaviour_NT = old_logp_NT
    if params.behaviour == "learner" or params.tis_cap is not None:
        behaviour_NT = learner_NT
    log_ratio = (logp_NT - behaviour_NT) * mask
    lo, hi = 1.0 - params.eps_low, 1.0 + params.eps_high
    lengths_N = mask.sum(-1).clamp(min=1.0)
    gspo = params.loss_type is LossType.GSPO

    if gspo:
        ratio = torch.exp(log_ratio.sum(-1, keepdim=True) / lengths_N.unsqueeze(-1))  # [N, 1]
    else:
        ratio = torch.exp(log_ratio)  # [N, T]
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, lo, hi) * adv)
    clipped = (ratio < lo) & (adv < 0) | (ratio > hi) & (adv > 0)
    if params.tis_cap is not None:
        gap = (learner_NT - old_logp_NT) * mask  # log(pi_learner / pi_engine)
        if gspo:
            gap = gap.sum(-1, keepdim=True) / lengths_N.unsqueeze(-1)  # [N, 1]
        surrogate = surrogate * torch.exp(gap).clamp(max=params.tis_cap)

    kl_NT = torch.zeros_like(logp_NT)
    if params.beta > 0:
        if ref_logp_NT is None:
            raise ValueError("beta > 0 needs reference logprobs (ref_logp_NT)")
        kl_NT = kl_k3(logp_NT, ref_logp_NT)

    if gspo:
        per_seq_N = -surrogate.squeeze(-1) + params.beta * (kl_NT * mask).sum(-1) / lengths_N
        total = per_seq_N.sum()
        clip_frac = clipped.float().mean()
    else:
        per_token_NT = (-surrogate + params.beta * kl_NT) * mask
        if params.loss_type is LossType.GRPO:
            total = (per_token_NT.sum(-1) / lengths_N).sum()
        else:  # DR_GRPO and DAPO sum tokens; they differ only in the normaliser
            total = per_token_NT.sum()
        clip_frac = masked_mean(clipped.float(), mask)

    if normaliser is None:
        normaliser = loss_normaliser(mask_NT, params)
    loss = total / normaliser
    stats = {
        "clip_frac": float(clip_frac),
        "kl": float(masked_mean(kl_NT.detach(), mask)),
        "ratio": float(masked_mean(torch.exp(log_ratio.detach()), mask)),
        **mismatch_stats(learner_NT, old_logp_NT, mask_NT),
    }
    return loss, stats


class GRPO(Objective):
    """The clipped policy loss on scored samples; ``settings.loss.loss_type`` picks the variant.
    Samples left out (reward error, too stale, duplicate) weigh nothing in the loss."""

    # never packed: the importance ratio divides by the rollout's logprobs, which rollout/hf.py
    # computes with group_logprobs on the padded layout; the same function on the same layout
    # keeps on-policy ratios at 1 in bf16 (tests/integration/test_dtypes.py)
    packs = False

    def count(self, batch: ScoredBatch) -> float:
        return loss_count(batch.loss_mask, self.settings.loss)

    def normaliser(self, total: float) -> float:
        return normaliser_from_count(total, self.settings.loss)

    def loss(
        self, logprobs: PolicyLogprobs, batch: ScoredBatch, normaliser: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # at the sampling temperature: the behaviour logprobs were taken at it
        logp_NT = logprobs(batch, self.settings.temperature)
        width = logp_NT.shape[1]
        ref_NT = None if batch.ref_logprobs is None else batch.ref_logprobs[:, :width]
        return policy_loss(
            logp_NT,
            batch.logprobs[:, :width],
            batch.advantages * batch.valid,
            batch.loss_mask[:, :width],
            self.settings.loss,
            ref_NT,
            normaliser,
        )
