"""Direct preference losses on (chosen, rejected) pairs: DPO, IPO and SimPO.

Shapes: P = preference pairs, N = sequences (a pair's chosen and rejected are two of them),
T = tokens. The losses take one summed sequence logprob per completion ([P] each), so the
learner runs its forward over whatever row layout it likes and reduces with
:func:`sequence_logps`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dist_ft.algos.common import group_slots
from dist_ft.algos.objective import Objective, PolicyLogprobs
from dist_ft.algos.settings import DPOLoss, DPOParams

if TYPE_CHECKING:
    from dist_ft.wire.batch import ScoredBatch


def sequence_logps(
    logp_NT: torch.Tensor, mask_NT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed logprob over its trained tokens [N], and that token count [N].

    logp_NT [N, T] token logprobs (:func:`dist_ft.algos.common.token_logprobs`); mask_NT [N, T]
    1 (True) on trained tokens, as ``ScoredBatch.loss_mask``. Masked positions are dropped with
    ``where`` rather than multiplied by 0, so a non-finite logprob on padding cannot leak in.
    """
    keep = mask_NT.bool()
    total_N = torch.where(keep, logp_NT, logp_NT.new_zeros(())).sum(-1)
    return total_N, keep.sum(-1).to(logp_NT.dtype)


def dpo_loss(
    policy_chosen_logp_P: torch.Tensor,
    policy_rejected_logp_P: torch.Tensor,
    ref_chosen_logp_P: torch.Tensor | None,
    ref_rejected_logp_P: torch.Tensor | None,
    params: DPOParams,
    chosen_len_P: torch.Tensor | None = None,
    rejected_len_P: torch.Tensor | None = None,
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss of one batch of pairs, summed over pairs and divided by ``normaliser``.

    policy_*_logp_P [P]: summed sequence logprobs under the policy, with grad. ref_*_logp_P [P]:
    the same under the frozen reference (SIGMOID, IPO; SIMPO ignores them, may be None).
    chosen_len_P, rejected_len_P [P]: trained-token counts (IPO and SIMPO; a count of 0 is
    taken as 1). ``normaliser`` (default: this batch's pair count) lets micro-batches and ranks
    share the whole step's pair count, so their summed gradients are the full batch's.

    IPO's log-ratios are per-token means. The paper writes sequence log-ratios, but summed ones
    grow with length while the target 1/(2 beta) does not, so beta would mean a different
    constraint for every length; TRL normalises (it says the IPO authors confirmed that their
    results use this form), and so do we, which keeps TRL parity. The length-normalised variant
    is SimPO rather than DPO on mean logprobs (TRL's "sigmoid_norm"): it also drops the reference
    model, its memory on every learner and its forward pass on every pair.

    Metrics, detached means over this batch's pairs (0 for an empty batch): ``rewards/*`` are
    the implicit rewards, beta x summed log-ratio for SIGMOID and IPO (as TRL logs them for both)
    and beta x mean logprob for SIMPO; ``rewards/accuracies`` is the fraction of pairs whose
    chosen reward is strictly higher; ``logps/*`` are the summed policy logprobs.
    """
    beta, eps = params.beta, params.label_smoothing
    if params.loss is DPOLoss.SIMPO:
        chosen_len, rejected_len = _lengths(chosen_len_P, rejected_len_P, params.loss)
        chosen_reward_P = beta * policy_chosen_logp_P / chosen_len
        rejected_reward_P = beta * policy_rejected_logp_P / rejected_len
        logits_P = chosen_reward_P - rejected_reward_P - params.simpo_gamma
        loss_P = -(1 - eps) * F.logsigmoid(logits_P) - eps * F.logsigmoid(-logits_P)
    else:
        if ref_chosen_logp_P is None or ref_rejected_logp_P is None:
            raise ValueError(f"{params.loss.value} needs reference logprobs")
        chosen_ratio_P = policy_chosen_logp_P - ref_chosen_logp_P
        rejected_ratio_P = policy_rejected_logp_P - ref_rejected_logp_P
        chosen_reward_P = beta * chosen_ratio_P
        rejected_reward_P = beta * rejected_ratio_P
        if params.loss is DPOLoss.SIGMOID:
            logits_P = beta * (chosen_ratio_P - rejected_ratio_P)
            loss_P = -(1 - eps) * F.logsigmoid(logits_P) - eps * F.logsigmoid(-logits_P)
        else:  # IPO
            chosen_len, rejected_len = _lengths(chosen_len_P, rejected_len_P, params.loss)
            h_P = chosen_ratio_P / chosen_len - rejected_ratio_P / rejected_len
            loss_P = (h_P - 1 / (2 * beta)) ** 2

    pairs = max(1, len(loss_P))
    if normaliser is None:
        normaliser = float(pairs)
    loss = loss_P.sum() / normaliser

    chosen_r, rejected_r = chosen_reward_P.detach(), rejected_reward_P.detach()
    metrics = {
        "rewards/chosen": chosen_r.sum() / pairs,
        "rewards/rejected": rejected_r.sum() / pairs,
        "rewards/margins": (chosen_r - rejected_r).sum() / pairs,
        "rewards/accuracies": (chosen_r > rejected_r).to(chosen_r.dtype).sum() / pairs,
        "logps/chosen": policy_chosen_logp_P.detach().sum() / pairs,
        "logps/rejected": policy_rejected_logp_P.detach().sum() / pairs,
    }
    return loss, metrics


def _lengths(
    chosen_len_P: torch.Tensor | None, rejected_len_P: torch.Tensor | None, loss: DPOLoss
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token counts as divisors: a completion with no trained token counts as 1 (as in TRL)."""
    if chosen_len_P is None or rejected_len_P is None:
        raise ValueError(f"{loss.value} needs token counts (chosen_len_P, rejected_len_P)")
    return chosen_len_P.clamp(min=1), rejected_len_P.clamp(min=1)


class DPO(Objective):
    """A preference loss over pairs (``settings.dpo``): each group is one pair, its first row
    the chosen answer and its second the rejected one; ``batch.ref_logprobs`` holds the
    reference policy's token logprobs (computed once per pair, before training)."""

    def count(self, batch: ScoredBatch) -> float:
        return float(int(batch.group_ids.max()) + 1) if len(batch) else 0.0  # pairs

    def loss(
        self, logprobs: PolicyLogprobs, batch: ScoredBatch, normaliser: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logp_NT = logprobs(batch, 1.0)
        mask_NT = batch.loss_mask[:, : logp_NT.shape[1]]
        seq_N, count_N = sequence_logps(logp_NT, mask_NT)
        ref_N = None
        if batch.ref_logprobs is not None:
            ref_N, _ = sequence_logps(batch.ref_logprobs[:, : logp_NT.shape[1]], mask_NT)
        slot_N = group_slots(batch.group_ids)
        # rows in group order, so chosen[i] and rejected[i] are the same pair
        chosen = torch.nonzero(slot_N == 0).squeeze(-1)
        chosen = chosen[torch.argsort(batch.group_ids[chosen])]
        rejected = torch.nonzero(slot_N == 1).squeeze(-1)
        rejected = rejected[torch.argsort(batch.group_ids[rejected])]
        loss, stats = dpo_loss(
            seq_N[chosen],
            seq_N[rejected],
            None if ref_N is None else ref_N[chosen],
            None if ref_N is None else ref_N[rejected],
            self.settings.dpo,
            count_N[chosen],
            count_N[rejected],
            normaliser,
        )
        return loss, {k: float(v) for k, v in stats.items()}
