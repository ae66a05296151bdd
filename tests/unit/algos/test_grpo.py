"""GRPO math against values worked out by hand (comments show the arithmetic)."""

import math

import pytest
import torch

from dist_ft.algos.common import merge_stats
from dist_ft.algos.grpo import (
    MismatchError,
    check_mismatch,
    group_advantages,
    kl_k3,
    loss_count,
    loss_normaliser,
    mismatch_stats,
    normaliser_from_count,
    policy_loss,
)
from dist_ft.algos.settings import LossParams, LossType

# Two sequences, three completion tokens; the second has two real tokens.
OLD = torch.zeros(2, 3)
NEW = torch.tensor([[math.log(1.5), math.log(0.5), 0.0], [math.log(1.1), 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -1.0])


def test_advantages_scaled_by_group_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735; 0.5 / (0.57735 + 1e-4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    expected = torch.tensor([[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(rewards), expected)


def test_dr_grpo_advantages_are_mean_centred_only():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5]])
    torch.testing.assert_close(group_advantages(rewards, scale=False), expected)


def test_invalid_samples_are_left_out_of_the_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, float("nan")]])
    valid = torch.tensor([[True, True, True, False]])
    # valid rewards 1, 0, 0: mean 1/3, unbiased std sqrt((4/9 + 1/9 + 1/9) / 2) = sqrt(1/3)
    s = math.sqrt(1 / 3) + 1e-4
    expected = torch.tensor([[(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, 0.0]])
    out = group_advantages(rewards, valid_BG=valid)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)


def test_group_with_one_valid_sample_has_zero_advantage():
    out = group_advantages(torch.tensor([[3.0, 1.0]]), valid_BG=torch.tensor([[True, False]]))
    torch.testing.assert_close(out, torch.zeros(1, 2))


def test_kl_k3_value():
    # d = log 0.5 - 0: exp(d) - d - 1 = 0.5 + log 2 - 1
    out = kl_k3(torch.zeros(1), torch.tensor([math.log(0.5)]))
    torch.testing.assert_close(out, torch.tensor([0.5 + math.log(2) - 1]))


# Ratios: row 0 = 1.5, 0.5, 1.0 (A = +1); row 1 = 1.1, 1.0 (A = -1).
# eps 0.2 token losses -min(rA, clip(r)A): row 0 -1.2, -0.5, -1.0; row 1 +1.1, +1.0.
@pytest.mark.parametrize(
    "loss_type,eps_high,expected",
    [
        # mean over sequences of per-sequence token means: (-2.7/3 + 2.1/2) / 2
        (LossType.GRPO, 0.2, (-0.9 + 1.05) / 2),
        # token sum over the constant N x max_tokens = 2 x 3
        (LossType.DR_GRPO, 0.2, (-2.7 + 2.1) / 6),
        # eps_high 0.28 clips 1.5 to 1.28: token sum over 5 real tokens
        (LossType.DAPO, 0.28, (-1.28 - 0.5 - 1.0 + 1.1 + 1.0) / 5),
        # one ratio per sequence: exp(mean log ratio); row 0 exp((log 1.5 + log 0.5) / 3) =
        # 0.908560 (A=+1, inside the clip range), row 1 sqrt(1.1) = 1.048809 (A=-1)
        (LossType.GSPO, 0.2, (-math.exp((math.log(1.5) + math.log(0.5)) / 3) + math.sqrt(1.1)) / 2),
    ],
)
def test_policy_loss_variants(loss_type, eps_high, expected):
    params = LossParams(loss_type=loss_type, eps_low=0.2, eps_high=eps_high, max_tokens=3)
    loss, stats = policy_loss(NEW, OLD, ADV, MASK, params)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert 0.0 <= stats["clip_frac"] <= 1.0


def test_clip_fraction_counts_only_clipped_tokens():
    params = LossParams(loss_type=LossType.GRPO, eps_low=0.2, eps_high=0.2)
    _, stats = policy_loss(NEW, OLD, ADV, MASK, params)
    # Only 1.5 with A=+1 is clipped (0.5 with A=+1 is below the range but not clipped by min).
    assert stats["clip_frac"] == pytest.approx(1 / 5)


def test_kl_term_adds_beta_times_mean_kl():
    ref = NEW + math.log(0.5)  # k3 = 0.5 + log 2 - 1 on every token
    k3 = 0.5 + math.log(2) - 1
    base = LossParams(loss_type=LossType.GRPO)
    with_kl = LossParams(loss_type=LossType.GRPO, beta=0.1)
    l0, _ = policy_loss(NEW, OLD, ADV, MASK, base)
    l1, stats = policy_loss(NEW, OLD, ADV, MASK, with_kl, ref_logp_NT=ref)
    assert float(l1 - l0) == pytest.approx(0.1 * k3, abs=1e-6)
    assert stats["kl"] == pytest.approx(k3, abs=1e-6)
    with pytest.raises(ValueError, match="reference logprobs"):
        policy_loss(NEW, OLD, ADV, MASK, with_kl)


@pytest.mark.parametrize("loss_type", list(LossType))
def test_split_batch_with_global_normaliser_sums_to_full_loss(loss_type):
    """What gradient accumulation and data parallelism rely on."""
    torch.manual_seed(0)
    new = torch.randn(6, 5, requires_grad=True)
    old = new.detach() + 0.1 * torch.randn(6, 5)
    adv = torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).long()
    mask[:, 0] = 1
    params = LossParams(loss_type=loss_type, max_tokens=5)
    full, _ = policy_loss(new, old, adv, mask, params)
    # what each rank computes: its share's count; the group's sum gives the full normaliser
    shares = (slice(0, 2), slice(2, 6))
    norm = normaliser_from_count(sum(loss_count(mask[s], params) for s in shares), params)
    assert norm == loss_normaliser(mask, params)
    parts = [
        policy_loss(new[s], old[s], adv[s], mask[s], params, normaliser=norm)[0] for s in shares
    ]
    torch.testing.assert_close(sum(parts), full)
    (g_full,) = torch.autograd.grad(full, new)
    (g_parts,) = torch.autograd.grad(sum(parts), new)
    torch.testing.assert_close(g_parts, g_full)


def test_on_policy_gradient_is_advantage_weighted_logprob_gradient():
    """At ratio 1 the GRPO gradient w.r.t. logp is -A / (|o| N) per token."""
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), ADV, MASK, LossParams())
    (g,) = torch.autograd.grad(loss, logp)
    expected = torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [1 / 4, 1 / 4, 0.0]])
    torch.testing.assert_close(g, expected)


def test_normaliser_counts_by_hand():
    # MASK: sequences with tokens 2, tokens 3 + 2 = 5; Dr.GRPO: 2 sequences x budget 3 = 6
    assert loss_normaliser(MASK, LossParams(LossType.GRPO)) == 2.0
    assert loss_normaliser(MASK, LossParams(LossType.DAPO)) == 5.0
    assert loss_normaliser(MASK, LossParams(LossType.DR_GRPO, max_tokens=3)) == 6.0
    # a step with nothing to train on divides by 1, not 0
    assert loss_normaliser(torch.zeros(2, 3), LossParams(LossType.DAPO)) == 1.0


# ---- sampler/learner mismatch and truncated importance sampling
# Learner logprobs (before its update) and the engine's, on two sequences of two tokens.
LEARNER = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]])
ENGINE = torch.tensor([[-1.5, -1.0], [-0.5, -3.0]])
MASK2 = torch.ones(2, 2)
ADV2 = torch.tensor([1.0, -1.0])


def test_mismatch_stats_by_hand():
    # log(pi_learner / pi_engine) = [[0.5, -1.0], [0.0, 1.5]]
    stats = mismatch_stats(LEARNER, ENGINE, MASK2)
    assert stats["mismatch/mean_abs_log_ratio"] == pytest.approx((0.5 + 1.0 + 0.0 + 1.5) / 4)
    assert stats["mismatch/max_abs_log_ratio"] == pytest.approx(1.5)
    # k3 of KL(engine || learner): r - 1 - log r with r = pi_learner / pi_engine
    k3 = [math.exp(d) - 1 - d for d in (0.5, -1.0, 0.0, 1.5)]
    assert stats["mismatch/k3"] == pytest.approx(sum(k3) / 4, rel=1e-6)


def test_truncated_importance_sampling_loss_by_hand():
    logp = LEARNER.clone().requires_grad_(True)
    params = LossParams(loss_type=LossType.GRPO, tis_cap=2.0)
    loss, stats = policy_loss(logp, ENGINE, ADV2, MASK2, params)
    # The ratio is the learner's (1 before its update); each token is weighed by
    # min(exp(learner - engine), 2): [[e^0.5, e^-1], [1, min(e^1.5, 2) = 2]].
    w = [[math.exp(0.5), math.exp(-1.0)], [1.0, 2.0]]
    # GRPO: per sequence the token mean of -w * A, then the mean over the 2 sequences
    seq0 = -(w[0][0] + w[0][1]) / 2 * 1.0
    seq1 = -(w[1][0] + w[1][1]) / 2 * -1.0
    assert float(loss.detach()) == pytest.approx((seq0 + seq1) / 2, rel=1e-6)
    loss.backward()
    # d/dlogp of -w * A * ratio / 2 tokens / 2 sequences, at ratio 1
    expected = torch.tensor([[-w[0][0], -w[0][1]], [w[1][0], w[1][1]]]) / 4
    torch.testing.assert_close(logp.grad, expected)
    assert stats["ratio"] == pytest.approx(1.0)


def test_behaviour_logprobs_choose_the_ratio_denominator():
    logp = LEARNER.clone().requires_grad_(True)
    # engine: the ratio divides by the engine's, exp([[0.5, -1], [0, 1.5]]), and is clipped
    _, engine = policy_loss(logp, ENGINE, ADV2, MASK2, LossParams(behaviour="engine"))
    ratio = [math.exp(d) for d in (0.5, -1.0, 0.0, 1.5)]
    assert engine["ratio"] == pytest.approx(sum(ratio) / 4, rel=1e-6)
    assert engine["clip_frac"] > 0
    # learner: its own logprobs, so on-policy at 1, nothing clipped; mismatch logged either way
    _, learner = policy_loss(logp, ENGINE, ADV2, MASK2, LossParams(behaviour="learner"))
    assert learner["ratio"] == pytest.approx(1.0) and learner["clip_frac"] == 0
    assert learner["mismatch/mean_abs_log_ratio"] == engine["mismatch/mean_abs_log_ratio"] > 0


def test_check_mismatch_stops_past_the_limit():
    stats = mismatch_stats(LEARNER, ENGINE, MASK2)  # mean 0.75
    check_mismatch(stats, None, 3)
    check_mismatch(stats, 0.8, 3)
    with pytest.raises(MismatchError, match=r"step 3: .* 0\.75 .* algo\.max_mismatch=0\.5"):
        check_mismatch(stats, 0.5, 3)


def test_merge_stats_means_and_maxima():
    parts = [
        {"ratio": 1.0, "mismatch/max_abs_log_ratio": 0.5},
        {"ratio": 3.0, "mismatch/max_abs_log_ratio": 2.0},
    ]
    assert merge_stats(parts) == {"ratio": 2.0, "mismatch/max_abs_log_ratio": 2.0}
