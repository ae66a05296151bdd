"""FLOPs per GRPO sample that TRL's GRPOTrainer and dist_ft's debug mode really compute, for the
peer bench's fraction of the machine's matmul peak (bench/peer_trl.py). Pure arithmetic.

Counted: the products with weights, 2 FLOPs per weight and token in a forward; a backward
computes the input gradient (2 per weight and token) of every layer and, for trained weights
alone, the weight gradient (2 more): the LoRA base is frozen. Not counted: attention's scores
(QK^T and AV, 4 x layers x hidden x context per token: ~2% of the total at the bench's ~50-token
contexts), elementwise work, the optimizer, and padding (mean lengths, not the padded widths a
batch runs at). Every omission undercounts, so the fraction of peak is a lower bound on the share
of time the machine spent multiplying, and never above 100%.

What each framework runs, per step of S = B x G samples, fp32, LoRA, beta 0 (P prompt and T
completion tokens):

- TRL 1.16: ``generate`` on each sample's own copy of the prompt (P + T - 1 forwards' worth of
  tokens, the LoRA update unmerged, the output layer at T positions), then one forward and
  backward over all P + T tokens. On CPU its fused log-prob head scores every position, not only
  the completion's (``trl.kernels.chunked_logprob._use_triton`` is false off CUDA/XPU), and its
  backward recomputes the logits: 2 + 2 + 2 per head weight and position. With
  gradient_accumulation_steps 1 and num_iterations 1 no old-policy pass runs, with beta 0 no
  reference one.
- dist_ft: a group's prompt is prefilled once for its G samples (P - 1 tokens, the output layer at
  one position), then G decodes of T tokens each on the merged weights (``rollout.merge_lora``:
  no LoRA matmuls, but W0 + B @ A is rebuilt once a step, 2 r x (adapted weights)). The behaviour
  logprobs come from the sampling pass (fp32). The learner runs each prompt once (P tokens,
  ``model.logprobs.group_logprobs``) and the G completions' T - 1 tokens against its cache,
  forward and backward, the output layer at 1 + G (T - 1) positions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """Weight counts of the policy (each used once per token by a forward)."""

    body: int  # linear weights below the output layer (attention and MLP, every layer)
    head: int  # the output layer's weights (vocabulary x hidden)
    adapter: int  # LoRA's A and B of every adapted layer: r x (in + out) each
    adapted: int  # the base weights of the adapted layers (what a merge rebuilds)
    rank: int  # LoRA's r


@dataclass(frozen=True)
class Step:
    prompt_tokens: float  # P, mean over the samples
    completion_tokens: float  # T, mean over the samples
    group_size: int  # G: samples per prompt
    samples: int  # S = B x G samples per step
    merged_decode: bool = True  # dist_ft's rollout.merge_lora


def trl_flops(m: Shape, s: Step) -> float:
    """FLOPs TRL's GRPOTrainer computes per sample (see the module docstring)."""
    p, t = s.prompt_tokens, s.completion_tokens
    generate = 2 * (m.body + m.adapter) * (p + t - 1) + 2 * m.head * t
    # forward 2, input gradient 2 on every weight; weight gradient 2 on the adapter alone
    train = (4 * m.body + 6 * m.adapter) * (p + t) + 6 * m.head * (p + t - 1)
    return generate + train


def dist_ft_flops(m: Shape, s: Step) -> float:
    """FLOPs dist_ft's debug mode computes per sample (see the module docstring)."""
    p, t, g = s.prompt_tokens, s.completion_tokens, s.group_size
    prefill = (2 * m.body * (p - 1) + 2 * m.head) / g  # once per group: a G-th per sample
    if s.merged_decode:
        decode = (2 * m.body + 2 * m.head) * t
        merge = 2 * m.rank * m.adapted / s.samples  # B @ A per adapted layer, once a step
    else:
        decode = (2 * m.body + 2 * m.adapter + 2 * m.head) * t
        prefill += 2 * m.adapter * (p - 1) / g
        merge = 0.0
    learner = (4 * m.body + 6 * m.adapter) * (p / g + t - 1) + 4 * m.head * (1 / g + t - 1)
    return prefill + decode + merge + learner


def fraction_of_peak(flops_per_sample: float, samples_per_s: float, peak_flops: float) -> float:
    """The share of the machine's matmul peak (FLOP/s) that ``samples_per_s`` samples of
    ``flops_per_sample`` each kept busy."""
    return flops_per_sample * samples_per_s / peak_flops
