"""Supervised fine-tuning loss: mean negative log-likelihood of target tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dist_ft.algos.objective import Objective, PolicyLogprobs

if TYPE_CHECKING:
    from dist_ft.wire.batch import ScoredBatch


def sft_loss(
    logp_NT: torch.Tensor, mask_NT: torch.Tensor, normaliser: float | None = None
) -> torch.Tensor:
    """Token-mean NLL. logp_NT [N, T] target-token logprobs; mask_NT [N, T] 1 on targets.

    ``normaliser`` (default: this batch's target-token count) lets micro-batches and ranks use
    the whole step's count, as for the GRPO losses.
    """
    mask = mask_NT.to(logp_NT.dtype)
    if normaliser is None:
        normaliser = float(mask.sum().clamp(min=1))
    return -(logp_NT * mask).sum() / normaliser


class SFT(Objective):
    """NLL of the trained tokens, over the step's trained-token count."""

    def count(self, batch: ScoredBatch) -> float:
        return float(batch.loss_mask.sum())

    def loss(
        self, logprobs: PolicyLogprobs, batch: ScoredBatch, normaliser: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # the model's own distribution (temperature 1): what demonstrations are scored under
        logp_NT = logprobs(batch, 1.0)
        return sft_loss(logp_NT, batch.loss_mask[:, : logp_NT.shape[1]], normaliser), {}
