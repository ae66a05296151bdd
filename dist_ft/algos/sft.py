"""Supervised fine-tuning loss: mean negative log-likelihood of target tokens."""

from __future__ import annotations

import torch


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
