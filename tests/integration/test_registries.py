"""The seams are registries: a new objective is one class plus one line in ``OBJECTIVES``, a new
advantage estimator one function plus one line in ``ADVANTAGES`` (tests/algos_toy.py holds a
REINFORCE objective and RLOO, added here as a user would). Real Learner, real rollouts."""

import torch
from support import build

from dist_ft.algos.advantages import ADVANTAGES
from dist_ft.algos.objective import OBJECTIVES, Registered
from dist_ft.learner import Learner
from dist_ft.rollout import RolloutWorker


def test_a_toy_objective_trains_through_learner_step(tiny_path, demo_prompts, monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "reinforce", Registered("algos_toy:Reinforce", None))
    _, wk, lk = build(tiny_path, "algo.prompts_per_step=4")
    learner = Learner(lk)
    batch = RolloutWorker(wk).rollout(1, demo_prompts[:4], seed=0)
    batch.advantages = torch.tensor([1.0, -1.0]).repeat(len(batch) // 2)
    before = {
        n: p.detach().clone() for n, p in learner.module.named_parameters() if p.requires_grad
    }
    plus = batch.advantages > 0

    def margin() -> float:  # mean sequence logprob of the +1 samples over the -1 samples'
        seq_N = learner.logprobs(batch).sum(-1)
        return float(seq_N[plus].mean() - seq_N[~plus].mean())

    start = margin()
    for _ in range(3):
        assert torch.isfinite(torch.tensor(learner.step(batch, "reinforce")["loss"]))
    after = dict(learner.module.named_parameters())
    assert all(not torch.equal(after[n], p) for n, p in before.items())  # every LoRA tensor moved
    # REINFORCE moved probability from the -1 samples to the +1 ones
    end = margin()
    assert end > start + 0.01


def test_a_toy_advantage_estimator_is_chosen_by_config(tiny_path, demo_prompts, monkeypatch):
    monkeypatch.setitem(ADVANTAGES, "rloo", "algos_toy:rloo_advantages")
    _, wk, _ = build(tiny_path, "algo.prompts_per_step=4", "grpo.advantage=rloo")
    batch = RolloutWorker(wk).rollout(1, demo_prompts[:4], seed=0)
    rewards_BG = batch.reward_total.view(4, -1).double()  # G samples of each prompt in a row
    g = rewards_BG.shape[1]
    loo_BG = rewards_BG - (rewards_BG.sum(-1, keepdim=True) - rewards_BG) / (g - 1)
    assert torch.allclose(batch.advantages.double(), loo_BG.flatten(), atol=1e-6)
    assert batch.advantages.abs().sum() > 0  # the rewards differed within some group
