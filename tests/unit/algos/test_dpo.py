"""DPO, IPO and SimPO losses: values worked out by hand (comments show the arithmetic), the
whole-step normaliser. Parity with TRL's loss code is in tests/integration/test_dpo_parity.py."""

import math

import pytest
import torch

from dist_ft.algos.dpo import dpo_loss, sequence_logps
from dist_ft.algos.settings import DPOLoss, DPOParams


def nls(x: float) -> float:
    """-log sigmoid(x), written out: log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


# Two pairs. Log-ratios (policy - reference): chosen 0.5, 0.5; rejected -1.0, -0.5;
# so h = chosen - rejected = 1.5, 1.0.
PC = torch.tensor([-1.0, -2.0])  # policy, chosen
PR = torch.tensor([-3.0, -1.5])  # policy, rejected
RC = torch.tensor([-1.5, -2.5])  # reference, chosen
RR = torch.tensor([-2.0, -1.0])  # reference, rejected
LC = torch.tensor([2.0, 4.0])  # trained tokens, chosen
LR = torch.tensor([4.0, 1.0])  # trained tokens, rejected


@pytest.mark.parametrize(
    "params,expected",
    [
        # beta 0.1: mean of -log sig(0.1 x 1.5), -log sig(0.1 x 1.0)
        (DPOParams(beta=0.1), (nls(0.15) + nls(0.1)) / 2),
        # cDPO, eps 0.1: -(0.9) log sig(x) - 0.1 log sig(-x) per pair
        (
            DPOParams(beta=0.1, label_smoothing=0.1),
            (0.9 * nls(0.15) + 0.1 * nls(-0.15) + 0.9 * nls(0.1) + 0.1 * nls(-0.1)) / 2,
        ),
        # IPO, per-token log-ratios: pair 0 0.5/2 - (-1.0)/4 = 0.5, pair 1 0.5/4 - (-0.5)/1 =
        # 0.625; target 1 / (2 x 0.1) = 5
        (DPOParams(loss=DPOLoss.IPO, beta=0.1), ((0.5 - 5) ** 2 + (0.625 - 5) ** 2) / 2),
        # SimPO beta 2, gamma 0.5: rewards 2 x mean logp, chosen -1/2 -> -1, -2/4 -> -1;
        # rejected -3/4 -> -1.5, -1.5/1 -> -3; logits -1 + 1.5 - 0.5 = 0, -1 + 3 - 0.5 = 1.5
        (DPOParams(loss=DPOLoss.SIMPO, beta=2.0, simpo_gamma=0.5), (math.log(2) + nls(1.5)) / 2),
        # SimPO with eps 0.2 on the same logits; at 0 both terms are log 2
        (
            DPOParams(loss=DPOLoss.SIMPO, beta=2.0, simpo_gamma=0.5, label_smoothing=0.2),
            (math.log(2) + 0.8 * nls(1.5) + 0.2 * nls(-1.5)) / 2,
        ),
    ],
)
def test_loss_values_by_hand(params, expected):
    loss, _ = dpo_loss(PC, PR, RC, RR, params, LC, LR)
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_simpo_needs_no_reference():
    params = DPOParams(loss=DPOLoss.SIMPO, beta=2.0)
    with_ref, _ = dpo_loss(PC, PR, RC, RR, params, LC, LR)
    without, _ = dpo_loss(PC, PR, None, None, params, LC, LR)
    torch.testing.assert_close(with_ref, without)


def test_metrics_by_hand():
    # Three pairs: chosen ahead, chosen behind, a tie (not counted as accurate).
    # log-ratios chosen 0.5, -1.0, 0.2; rejected -1.0, -0.5, 0.2
    pc, rc = torch.tensor([-1.0, -2.0, -1.0]), torch.tensor([-1.5, -1.0, -1.2])
    pr, rr = torch.tensor([-3.0, -1.5, -2.0]), torch.tensor([-2.0, -1.0, -2.2])
    _, m = dpo_loss(pc, pr, rc, rr, DPOParams(beta=0.1))
    expected = {
        "rewards/chosen": 0.1 * (0.5 - 1.0 + 0.2) / 3,
        "rewards/rejected": 0.1 * (-1.0 - 0.5 + 0.2) / 3,
        "rewards/margins": 0.1 * (1.5 - 0.5 + 0.0) / 3,
        "rewards/accuracies": 1 / 3,
        "logps/chosen": (-1.0 - 2.0 - 1.0) / 3,
        "logps/rejected": (-3.0 - 1.5 - 2.0) / 3,
    }
    assert {k: float(v) for k, v in m.items()} == pytest.approx(expected, abs=1e-6)
    assert not any(v.requires_grad for v in m.values())


def test_simpo_rewards_are_beta_times_mean_logprob():
    # chosen 2 x (-1/2, -2/4) = -1, -1; rejected 2 x (-3/4, -1.5/1) = -1.5, -3
    params = DPOParams(loss=DPOLoss.SIMPO, beta=2.0)
    _, m = dpo_loss(PC, PR, None, None, params, LC, LR)
    assert float(m["rewards/chosen"]) == pytest.approx(-1.0)
    assert float(m["rewards/rejected"]) == pytest.approx(-2.25)
    assert float(m["rewards/margins"]) == pytest.approx(1.25)
    assert float(m["rewards/accuracies"]) == 1.0


def test_sequence_logps_sums_trained_tokens_only():
    # -inf on a padding position must not reach the sum (0 x -inf would be nan)
    logp = torch.tensor([[-9.0, -1.0, -2.0], [-0.5, -math.inf, -1.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [1, 0, 1]])
    total, count = sequence_logps(logp, mask)
    torch.testing.assert_close(total, torch.tensor([-3.0, -1.5]))
    torch.testing.assert_close(count, torch.tensor([2.0, 2.0]))
    (g,) = torch.autograd.grad(total.sum(), logp)
    torch.testing.assert_close(g, mask.float())


PARAMS = [
    DPOParams(beta=0.5, label_smoothing=0.1),
    DPOParams(loss=DPOLoss.IPO, beta=0.5),
    DPOParams(loss=DPOLoss.SIMPO, beta=2.0, simpo_gamma=0.4),
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: p.loss.value)
def test_split_pairs_with_whole_step_normaliser_sum_to_full_loss(params):
    """What gradient accumulation and data parallelism rely on: each share divides by the
    step's pair count (5 here), and the shares' losses and gradients add up to the whole."""
    g = torch.Generator().manual_seed(0)
    pc, pr = (-5 * torch.rand(5, generator=g)).requires_grad_(), -5 * torch.rand(5, generator=g)
    rc, rr = -5 * torch.rand(5, generator=g), -5 * torch.rand(5, generator=g)
    lc, lr = torch.tensor([3.0, 1, 4, 2, 5]), torch.tensor([2.0, 2, 1, 6, 3])
    full, _ = dpo_loss(pc, pr, rc, rr, params, lc, lr)
    parts = [
        dpo_loss(pc[s], pr[s], rc[s], rr[s], params, lc[s], lr[s], normaliser=5.0)[0]
        for s in (slice(0, 2), slice(2, 5))
    ]
    torch.testing.assert_close(sum(parts), full)
    (g_full,) = torch.autograd.grad(full, pc)
    (g_parts,) = torch.autograd.grad(sum(parts), pc)
    torch.testing.assert_close(g_parts, g_full)


def test_empty_share_adds_nothing():
    """A rank or micro-batch with no pairs (rows < micro_batches) adds 0, and its metrics stay
    finite."""
    empty = torch.zeros(0, requires_grad=True)
    loss, m = dpo_loss(empty, empty, empty, empty, DPOParams(), normaliser=4.0)
    assert float(loss.detach()) == 0.0
    assert all(float(v) == 0.0 for v in m.values())


def test_bad_params_and_missing_inputs_are_errors():
    with pytest.raises(ValueError, match="no label smoothing"):
        DPOParams(loss=DPOLoss.IPO, label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOParams(label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        DPOParams(beta=0.0)
    with pytest.raises(ValueError, match="reference logprobs"):
        dpo_loss(PC, PR, None, None, DPOParams())
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(PC, PR, RC, RR, DPOParams(loss=DPOLoss.IPO))
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(PC, PR, None, None, DPOParams(loss=DPOLoss.SIMPO))
