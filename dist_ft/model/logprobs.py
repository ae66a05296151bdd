"""Logprobs of completions under a policy: one forward per batch (``completion_logprobs``), the
prompt once per group (``group_logprobs``), or packed episodes (``packed_completion_logprobs``).

Shapes: N = sequences, P = prompt tokens, T = completion tokens."""

from __future__ import annotations

import torch
from torch import nn

from dist_ft.algos.common import token_logprobs
from dist_ft.model.spec import HFModel, PeftMethod, PeftSpec


def completion_logprobs(
    model: nn.Module,
    prompt_ids_NP: torch.Tensor,
    prompt_mask_NP: torch.Tensor,
    completion_ids_NT: torch.Tensor,
    completion_mask_NT: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Logprob of every completion token under ``model`` at the sampling temperature. [N, T].

    Positions are counted from the first real token, as ``generate`` does under left padding, so
    the rollout's behaviour logprobs and the learner's match to float tolerance.
    """
    ids = torch.cat([prompt_ids_NP, completion_ids_NT], dim=1).long()
    mask = torch.cat([prompt_mask_NP, completion_mask_NT], dim=1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Logits at position i predict token i + 1: the completion is predicted from the last prompt
    # position onward, so only the last T + 1 positions go through the output layer (a 49k-vocab
    # head is a fifth of a small model's FLOPs per token; the prompt's logits are never used).
    t = completion_ids_NT.shape[1]
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=t + 1
    ).logits  # [N, T + 1, V]
    # counted from the end: a remote-code model that ignores logits_to_keep returns them all
    return token_logprobs(logits[:, -(t + 1) : -1, :], completion_ids_NT, temperature)


def shares_prompt_cache(peft: PeftSpec) -> bool:
    """Whether a prompt's KV cache, computed once, may serve its G samples (the rollout's
    shared prefill, the learner's :func:`group_logprobs`): not under prefix tuning, whose
    virtual tokens peft puts first in the cache."""
    return peft.method is not PeftMethod.PREFIX


def group_logprobs(
    model: nn.Module,
    prompt_ids_BP: torch.Tensor,
    prompt_mask_BP: torch.Tensor,
    group_ids_N: torch.Tensor,
    completion_ids_NT: torch.Tensor,
    completion_mask_NT: torch.Tensor,
    temperature: float = 1.0,
    share_prompts: bool = True,
) -> torch.Tensor:
    """:func:`completion_logprobs` of samples that share prompts: [N, T], sample i continuing
    prompt row ``group_ids_N[i]`` of the [Bg, P] table. With ``share_prompts`` each prompt runs
    through the model once, and its KV cache is indexed out to its samples, which run their
    completions against it; without it (or when no prompt has two samples) every sample runs
    its own copy, as :func:`completion_logprobs` does.

    A GRPO group's G samples share one prompt. The padded forward runs it G times, forward and
    backward; here it runs once, and the G completions' gradients meet in its KV cache. On the
    peer bench (SmolLM2, ~33 prompt tokens, G=4, 16 new tokens) that is half the learner's
    FLOPs. The arithmetic is the one ``generate`` does (prefill, then the new tokens against the
    cache), so it agrees with the rollout's sampling-pass logprobs at least as closely as the
    padded forward does. Not for prefix tuning (peft's virtual tokens must come first in the
    cache), nor for a model that takes no ``past_key_values``.
    """
    if not share_prompts or len(group_ids_N) <= len(prompt_ids_BP):
        return completion_logprobs(
            model,
            prompt_ids_BP[group_ids_N],
            prompt_mask_BP[group_ids_N],
            completion_ids_NT,
            completion_mask_NT,
            temperature,
        )
    from transformers import DynamicCache

    t = completion_ids_NT.shape[1]
    positions_BP = (prompt_mask_BP.cumsum(-1) - 1).clamp(min=0)
    # the model's config (sliding-window layers need it), under a DeepSpeed engine's wrapper too
    hf_model: HFModel = getattr(model, "module", model)
    cache = DynamicCache(config=hf_model.config)
    # the last prompt position's logits predict each sample's first token: [Bg, 1, V]
    first_B1V = model(
        input_ids=prompt_ids_BP.long(),
        attention_mask=prompt_mask_BP.long(),
        position_ids=positions_BP,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1:]
    group_ids_N = group_ids_N.long().to(prompt_ids_BP.device)
    first_N1 = token_logprobs(first_B1V[group_ids_N], completion_ids_NT[:, :1], temperature)
    if t == 1:
        return first_N1
    # [Bg, ...] -> [N, ...] in every layer; differentiable, so each prompt's gradient is the sum
    # over its samples
    # transformers annotates the index as the legacy torch.LongTensor; a long Tensor is one
    cache.reorder_cache(group_ids_N)  # type: ignore[arg-type]
    prompt_mask_NP = prompt_mask_BP[group_ids_N].long()
    start_N1 = prompt_mask_NP.sum(-1, keepdim=True)  # the first completion token's position
    rest_NTV = model(
        input_ids=completion_ids_NT[:, :-1].long(),
        attention_mask=torch.cat([prompt_mask_NP, completion_mask_NT[:, :-1].long()], dim=1),
        position_ids=start_N1 + torch.arange(t - 1, device=start_N1.device),
        past_key_values=cache,
        use_cache=True,
    ).logits  # [N, T - 1, V]
    # the two parts' logprobs side by side, not their logits: no [N, T, V] copy
    rest_NT = token_logprobs(rest_NTV, completion_ids_NT[:, 1:], temperature)
    return torch.cat([first_N1, rest_NT], dim=1)


def packed_completion_logprobs(
    model: nn.Module,
    prompt_ids_NP: torch.Tensor,
    prompt_mask_NP: torch.Tensor,
    completion_ids_NT: torch.Tensor,
    completion_spans_NT: torch.Tensor,
    temperature: float = 1.0,
    mask_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`completion_logprobs` with the rows packed (``packing.pack_episodes``): the same
    [N, T] logprobs from one forward over fewer rows and no padding tokens.

    Each example keeps the positions it has alone (they restart at 0, as the padded forward's
    count from the first real token), and the block-causal mask keeps it from attending to the
    others, so its logprobs equal the padded forward's to float error. ``mask_dtype`` is the
    model's compute dtype: the additive mask must match the attention scores' (sdpa refuses
    another float dtype). Not for prefix tuning: peft concatenates its prefix's columns to a 2D
    mask, which a 4D mask cannot take. Nor for flash-attention 2, which takes no 4D mask.
    """
    from dist_ft.wire.batch import Span
    from dist_ft.wire.packing import block_causal_mask, pack_episodes

    real_NT = completion_spans_NT != Span.PAD
    length_N = prompt_mask_NP.sum(-1) + real_NT.sum(-1)
    if len(length_N) < 2 or int(length_N.topk(2, largest=False).values.sum()) > length_N.max():
        # No two examples fit in one row (equal lengths, say): packing would save no token,
        # yet costs its layout (~2 ms for 32 rows) and an explicit 4D mask in attention. The
        # tiny model's demo batch, 32 rows of 14 tokens, took 39 ms an SFT step packed, 33 padded.
        return completion_logprobs(
            model, prompt_ids_NP, prompt_mask_NP, completion_ids_NT, real_NT, temperature
        )
    device = completion_ids_NT.device
    packed, source_NT = pack_episodes(
        prompt_ids_NP.long(), prompt_mask_NP, completion_ids_NT.long(), completion_spans_NT
    )
    logits_RTV = model(
        input_ids=packed.ids_NT.to(device),
        attention_mask=block_causal_mask(packed.example_ids_NT.to(device), mask_dtype),
        position_ids=packed.position_ids_NT.to(device),
    ).logits
    out = logits_RTV.device
    # only the scoring positions go through the vocabulary softmax: [M, V], M episode tokens
    logits_MV = logits_RTV.flatten(0, 1)[source_NT[real_NT].to(out)]
    logp_M = token_logprobs(logits_MV, completion_ids_NT[real_NT].to(out), temperature)
    out_NT = torch.zeros(completion_ids_NT.shape, dtype=logp_M.dtype, device=out)
    return out_NT.masked_scatter(real_NT.to(out), logp_M)
