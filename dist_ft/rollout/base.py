"""The generation seam: what a rollout worker asks of an inference engine.

A :class:`Generator` loads weights, samples ``n`` completions per prompt with the logprobs of the
distribution it sampled from, and (when the KL term is on) the reference policy's logprobs. The
rollout worker keeps everything else (rewards, advantages, the payload), so a new engine (vLLM on
GPUs, a multi-turn environment wrapping generation) is one new file plus one
line in :data:`GENERATORS`.

Shapes: N = B x G samples (B prompts, G completions each), P = prompt tokens (left-padded),
T = episode tokens after the prompt (right-padded; single-turn: the completions, T the longest
of them, at most ``max_new_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from dist_ft.model.spec import Device, DType, PeftSpec

# name -> "module:Class": the built-in engines (rollout.generator); a user's is named as
# "package.module:Class" directly
GENERATORS: dict[str, str] = {
    "hf": "dist_ft.rollout.hf:HFGenerator",  # transformers generate; logprobs from its logits
    "vllm": "dist_ft.rollout.vllm_engine:VLLMGenerator",  # a vLLM engine in a child process
}


@dataclass(frozen=True)
class GeneratorSpec:
    """What an engine is built from: ``Engine(spec)`` for every generator, built-in or a
    user's ``package.module:Class``."""

    model_path: str
    dtype: DType  # the rollout dtype
    peft: PeftSpec  # the same method as the learner: the weights it receives are its tensors
    device: Device
    max_new_tokens: int
    temperature: float
    top_p: float
    need_ref_logprobs: bool  # the KL term is on: return the reference policy's logprobs
    trust_remote_code: bool = False
    # The engine's own settings, a frozen dataclass it defines (HFGenerator: HFOptions, built by
    # run/specs.py); None: the engine's defaults (a user's engine gets None)
    options: object | None = None


@dataclass
class Generation:
    """What an engine returns. Each prompt comes once; ``group_ids`` says which prompt each
    sample continues, so an engine may return samples in any order (a multi-turn environment
    finishes episodes out of order). ``episode_mask`` holds :class:`dist_ft.wire.batch.Span` codes:
    the tokens the policy sampled are TRAINED, env/tool tokens between turns are CONTEXT."""

    prompt_ids: torch.Tensor  # [B, P] int64, left-padded, one row per prompt
    prompt_mask: torch.Tensor  # [B, P] long
    group_ids: torch.Tensor  # [N] long: the prompt row of each sample
    episode_ids: torch.Tensor  # [N, T] int64, right-padded
    episode_mask: torch.Tensor  # [N, T] int8 Span codes; single-turn: TRAINED up to EOS
    logprobs: torch.Tensor  # [N, T] float32, the sampling distribution, 0 off TRAINED tokens
    ref_logprobs: torch.Tensor | None  # [N, T] float32, reference policy; None when not asked
    texts: list[str]  # [N] decoded episodes (the completions), special tokens removed


@dataclass(frozen=True)
class SampledTurn:
    """One model turn of a multi-turn episode, as sampled: ids up to and including EOS (or the
    turn's budget), and each one's behaviour logprob."""

    ids: list[int]
    logprobs: list[float]


class Generator(Protocol):
    """The engine seam. Optional, and not part of the protocol:

    - ``share_frozen(learner_module)``: in debug mode ``LocalCluster`` calls it on an engine
      that has it, so that an engine in the learner's process may read the learner's frozen
      tensors instead of holding copies (``HFGenerator.share_frozen``).
    - multi-turn environments (``env.name``, ``rollout/episodes.py``) need ``tokenizer`` (an
      HF tokenizer with a chat template), ``sample(contexts, budgets) -> list[SampledTurn]``
      (one turn for each token context, in one batch) and, with the KL term on,
      ``reference_logprobs(prompt_ids, prompt_mask, group_ids, episode_ids, attention,
      trained)`` (``HFGenerator``'s).
    """

    def generate(self, prompts: list[str], n: int) -> Generation:
        """``n`` sampled episodes per prompt; ``group_ids`` names each one's prompt."""
        ...

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a weight sync: the trainable tensors under PEFT, every weight otherwise."""
        ...

    def export_weights(self) -> dict[str, torch.Tensor]:
        """Optional (read-back): what the engine really holds, in the form the learner sends,
        re-hashed every ``rollout.read_back_every``-th sync to catch a load that converts or
        drops. An engine whose weights are fused or sharded cannot give the exact bytes back:
        it leaves the method out (or sets it to None), and its syncs are checked by the bytes that
        arrived."""
        ...

    def use_adapter(self, name: str) -> None:
        """Generate with adapter ``name`` from now on. Called only under ``peft.adapters``; an
        engine without it is refused when such a worker starts."""
        ...
