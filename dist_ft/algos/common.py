"""Pieces shared by every algorithm's loss."""

from __future__ import annotations

import torch


def token_logprobs(
    logits_NTV: torch.Tensor, ids_NT: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each token in ``ids_NT`` under ``logits_NTV / temperature``.

    ``logits_NTV`` [N, T, V] must already be aligned so that position t predicts ``ids_NT[:, t]``.
    Returns [N, T], float32 whatever the logits' dtype: a bf16 log-softmax loses enough precision
    to move the importance ratio off 1 on-policy. At temperature 1 the division, an exact no-op,
    is skipped: it would copy [N, T, V] (50 MB for 16 x 16 tokens of a 49k vocabulary).
    """
    logits = logits_NTV.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, ids_NT.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 when the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def merge_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    """One step's statistics from its micro-batches' (or learner ranks'): a ``.../max_...`` key
    is the largest part's, every other key the parts' mean."""
    keys = dict.fromkeys(k for part in parts for k in part)
    return {
        k: max(p[k] for p in parts) if "/max_" in k else sum(p[k] for p in parts) / len(parts)
        for k in keys
    }


def group_slots(group_N: torch.Tensor) -> torch.Tensor:
    """Each sample's place within its group, in row order: [N] long.

    ``group_N`` [N] holds group ids in ``0..Bg-1`` (any row order, any group sizes). Samples of
    group g get 0, 1, 2, ... in the order their rows appear, so groups need not be contiguous.
    """
    group = group_N.long()
    order = torch.argsort(group, stable=True)  # rows grouped, row order kept within a group
    counts = torch.bincount(group, minlength=int(group.max()) + 1 if len(group) else 0)
    starts = counts.cumsum(0) - counts  # [Bg] first sorted position of each group
    slots = torch.empty_like(group)
    slots[order] = torch.arange(len(group)) - starts[group[order]]
    return slots
