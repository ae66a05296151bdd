"""A toy objective and a toy advantage estimator, each written as a user would add one: a class
or function here, plus one registry line (the tests add it with ``monkeypatch.setitem``)."""

from __future__ import annotations

import torch

from dist_ft.algos.objective import Objective, PolicyLogprobs
from dist_ft.wire.batch import ScoredBatch


class Reinforce(Objective):
    """Plain REINFORCE: -A x (sum of the sampled tokens' logprobs), averaged over sequences."""

    packs = False

    def count(self, batch: ScoredBatch) -> float:
        return float((batch.loss_mask.sum(-1) > 0).sum())

    def loss(
        self, logprobs: PolicyLogprobs, batch: ScoredBatch, normaliser: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logp_NT = logprobs(batch, self.settings.temperature)
        mask_NT = batch.loss_mask[:, : logp_NT.shape[1]].to(logp_NT.dtype)
        seq_N = (logp_NT * mask_NT).sum(-1)
        loss = -(batch.advantages * batch.valid * seq_N).sum() / normaliser
        return loss, {"seq_logp": float(seq_N.mean().detach())}


def rloo_advantages(
    rewards_BG: torch.Tensor, scale: bool = True, valid_BG: torch.Tensor | None = None
) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): each sample's reward less the mean of the other valid
    samples of its group; 0 where a group has fewer than two valid samples. ``scale`` unused."""
    if valid_BG is None:
        valid_BG = torch.ones_like(rewards_BG, dtype=torch.bool)
    w = valid_BG.to(rewards_BG.dtype)
    n = w.sum(-1, keepdim=True)
    total = (rewards_BG * w).sum(-1, keepdim=True)
    others = (total - rewards_BG * w) / (n - 1).clamp(min=1)
    return torch.where(valid_BG & (n >= 2), rewards_BG - others, torch.zeros_like(rewards_BG))
