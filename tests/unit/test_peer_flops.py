"""bench/flops.py: the FLOPs per sample the peer bench divides by the matmul peak, counted by hand
for a small configuration, and a fraction of peak that cannot pass 100%."""

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "flops", Path(__file__).resolve().parents[2] / "bench" / "flops.py"
)
flops = sys.modules["flops"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(flops)

# 100 body weights, 10 in the output layer, 4 LoRA weights of rank 2 over all 100 body weights;
# prompts of 9 tokens, completions of 5, 2 groups of G=4
SHAPE = flops.Shape(body=100, head=10, adapter=4, adapted=100, rank=2)
STEP = flops.Step(prompt_tokens=9, completion_tokens=5, group_size=4, samples=8)
# SmolLM2-135M with LoRA r8 on every linear layer (bench/peer_trl.py's model_shape), chat prompts
SMOLLM2 = flops.Shape(
    body=106_168_320, head=28_311_552, adapter=2_442_240, adapted=106_168_320, rank=8
)
BENCH = flops.Step(prompt_tokens=33, completion_tokens=15, group_size=4, samples=16)


def test_trl_counts_every_samples_prompt_and_scores_every_position_on_cpu():
    # generate: 9 + 5 - 1 = 13 token forwards through body and LoRA, 2 x 104 each: 2704;
    # the output layer at the 5 sampled positions, 2 x 10 each: 100
    generate = 2704 + 100
    # train: 14 tokens forward (2) and input gradient (2) through the body, 4 x 100, and LoRA's
    # forward, input and weight gradients, 6 x 4: 14 x 424 = 5936; the output layer at the 13
    # scored positions, forward, recomputed forward and input gradient: 13 x 6 x 10 = 780
    train = 5936 + 780
    assert flops.trl_flops(SHAPE, STEP) == generate + train == 9520


def test_dist_ft_counts_each_groups_prompt_once_and_the_merge_once_a_step():
    # prefill: 8 prompt tokens x 2 x 100, plus one output position, 2 x 10, for the group's 4
    prefill = (1600 + 20) / 4
    # decode on the merged weights: 5 tokens x 2 x (100 + 10)
    decode = 1100
    # the merge, B @ A over 100 adapted weights at rank 2, once for the step's 8 samples
    merge = 2 * 2 * 100 / 8
    # learner: the prompt's 9 tokens once per group and the 4 completion tokens against its
    # cache, 424 each as for TRL; the output layer at 1/4 + 4 positions, forward and input grad
    learner = (9 / 4 + 4) * 424 + (1 / 4 + 4) * 4 * 10
    assert flops.dist_ft_flops(SHAPE, STEP) == prefill + decode + merge + learner == 4375
    # rollout.merge_lora=false: no merge; LoRA's 2 x 4 per token in the 8/4 prefill and 5 decode
    # tokens instead
    unmerged = flops.Step(
        prompt_tokens=9, completion_tokens=5, group_size=4, samples=8, merged_decode=False
    )
    assert flops.dist_ft_flops(SHAPE, unmerged) == 4375 - merge + 8 * (8 / 4 + 5) == 4381


@pytest.mark.parametrize("count", [flops.trl_flops, flops.dist_ft_flops])
def test_a_step_as_fast_as_the_peak_allows_is_100_percent_and_never_more(count):
    peak = 235.4e9  # FLOP/s, the bench machine's measured fp32 matmul rate
    per_sample = count(SMOLLM2, BENCH)
    step_s = BENCH.samples * per_sample / peak  # the compute time at peak
    assert flops.fraction_of_peak(per_sample, BENCH.samples / step_s, peak) == pytest.approx(1.0)


def test_the_issues_113_percent_is_half_the_peak_counted_as_computed():
    # dist_ft at 267 GFLOP/s of 6 N (P + T) work (every sample its own prompt) was 113% of a
    # 235.4 GFLOP/s peak; the same samples/s counted as dist_ft computes them: 50%
    peak, n = 235.4e9, SMOLLM2.body + SMOLLM2.head
    samples_per_s = 267e9 / (6 * n * 48)
    assert flops.fraction_of_peak(6 * n * 48, samples_per_s, peak) == pytest.approx(1.134, abs=1e-3)
    counted = flops.fraction_of_peak(flops.dist_ft_flops(SMOLLM2, BENCH), samples_per_s, peak)
    assert counted == pytest.approx(0.505, abs=1e-3)
