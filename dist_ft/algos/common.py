"""Pieces shared by every algorithm's loss."""

from __future__ import annotations

import torch


def token_logprobs(logits_NTV: torch.Tensor, ids_NT: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token in ``ids_NT`` under ``logits_NTV``.

    ``logits_NTV`` [N, T, V] must already be aligned so that position t predicts ``ids_NT[:, t]``.
    Returns [N, T], float32 whatever the logits' dtype: a bf16 log-softmax loses enough precision
    to move the importance ratio off 1 on-policy.
    """
    logits = logits_NTV.float()
    picked = torch.gather(logits, -1, ids_NT.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 when the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)
