"""The generation seam: what a rollout worker asks of an inference engine.

A :class:`Generator` loads weights, samples ``n`` completions per prompt with the logprobs of the
distribution it sampled from, and (when the KL term is on) the reference policy's logprobs. The
rollout worker keeps everything else (rewards, advantages, the payload), so a new engine (vLLM on
GPUs, a multi-turn environment wrapping generation) is one new file plus one
:class:`GeneratorKind` value.

Shapes: N = B x G samples (B prompts, G completions each), P = prompt tokens (left-padded),
T = completion tokens (right-padded to ``max_new_tokens``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch


class GeneratorKind(str, enum.Enum):
    HF = "hf"  # transformers ``generate``, then one scoring forward for the logprobs


@dataclass
class Generation:
    prompt_ids: torch.Tensor  # [N, P] int64, left-padded, each prompt repeated G times
    prompt_mask: torch.Tensor  # [N, P] long
    completion_ids: torch.Tensor  # [N, T] int64, right-padded to max_new_tokens
    completion_mask: torch.Tensor  # [N, T] long, 1 up to and including EOS
    logprobs: torch.Tensor  # [N, T] float32, the sampling distribution, 0 on padding
    ref_logprobs: torch.Tensor | None  # [N, T] float32, reference policy; None when not asked
    texts: list[str]  # [N] decoded completions, special tokens removed


class Generator(Protocol):
    def generate(self, prompts: list[str], n: int) -> Generation:
        """``n`` sampled completions per prompt, grouped: rows i*n .. i*n+n-1 are prompt i's."""
        ...

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a weight sync: the trainable tensors under PEFT, every weight otherwise."""
        ...

    def export_weights(self) -> dict[str, torch.Tensor]:
        """What the engine really holds, in the form the learner sends (for fingerprints)."""
        ...
