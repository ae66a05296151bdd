"""Batching variable-length examples (SFT rows, DPO sides) for one forward pass. Pure torch.

Shapes: E examples in, each ids_L [L] with spans_L [L] (:class:`Span` codes); N rows of T tokens
out. Padding (:func:`pad_examples`) gives one example per row; packing (:func:`pack_examples`)
puts several in a row of at most ``max_tokens``, so a batch of short examples wastes no compute
on padding. A packed row needs two things from the forward to score each example as if alone:

- a block-diagonal causal mask [N, 1, T, T] (:func:`block_causal_mask`), so no token attends to
  another example, and
- position ids that restart at 0 for each example, so each sees the positions it would alone.
  With RoPE (Llama, the tiny model) the mask alone already gives the same logprobs to float
  error, since rotary scores depend only on q - k within a block; restarting positions is what
  makes it exact for absolute-position models, and keeps bf16 angles as small as when alone.

What transformers 5.x does with these (read in masking_utils.py and modeling_llama.py of 5.23,
and checked on the tiny Llama on CPU, sdpa and eager, by tests/integration/test_packing.py):

- A 4D ``attention_mask`` goes to the attention kernel as it is (``_preprocess_mask_arguments``
  returns it untouched). sdpa passes it to ``scaled_dot_product_attention``, which takes either
  bool (True = attend) or an additive float mask. Eager *adds* it to the scores, so a bool mask
  there is silently wrong (an allowed key gets +1.0, a masked one +0.0). An additive float mask
  (0 or the dtype's min) is right for both; it is :func:`block_causal_mask`'s default.
- Restarting ``position_ids`` alone isolate examples only when ``attention_mask`` is None and
  there is no cache: then ``find_packed_sequence_indices`` infers the blocks from the position
  resets. But ``LlamaConfig.use_cache`` defaults to True, so a plain training forward builds an
  empty ``DynamicCache`` and skips that inference, and a 2D ``attention_mask`` (as the padded
  forward passes) skips it too. Either way attention leaks across examples, silently (only an
  explicit ``use_cache=False`` with no mask isolates them). Hence the explicit 4D mask, which
  depends on neither.

:func:`pack_episodes` packs a ``ScoredBatch``'s rows this way: the learner's SFT and DPO forward
(``models.packed_completion_logprobs``), which reads each episode token's logprob back into the
batch's [N, T] layout, so the losses do not change.

A row's logits at t score token t + 1 (:func:`scored_targets`): the last token of one example
must not score the first of the next, so each example's first token is never scored. The data
loaders keep it CONTEXT (``data._example`` rejects a sequence that starts TRAINED).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dist_ft.wire.batch import Span


@dataclass(frozen=True)
class PackedRows:
    ids_NT: torch.Tensor  # [N, T] long token ids; pad_id after a row's last example
    spans_NT: torch.Tensor  # [N, T] int8 Span codes; PAD after a row's last example
    position_ids_NT: torch.Tensor  # [N, T] long, 0 at each example's first token (and padding's)
    # [N, T] long: the index (into the packed list) of the example each token belongs to, -1 on
    # padding. Segment ids for block_causal_mask and example_sums.
    example_ids_NT: torch.Tensor


def _check(ids_L: Sequence[torch.Tensor], spans_L: Sequence[torch.Tensor]) -> list[int]:
    if len(ids_L) != len(spans_L):
        raise ValueError(f"{len(ids_L)} id sequences but {len(spans_L)} span sequences")
    if not ids_L:
        raise ValueError("no examples")
    lengths = [len(x) for x in ids_L]
    for e, (ids, spans) in enumerate(zip(ids_L, spans_L)):
        if ids.ndim != 1 or ids.shape != spans.shape or len(ids) == 0:
            raise ValueError(
                f"example {e}: ids {tuple(ids.shape)} and spans {tuple(spans.shape)} must be the "
                "same non-empty 1-D shape"
            )
    return lengths


def pack_examples(
    ids_L: Sequence[torch.Tensor],
    spans_L: Sequence[torch.Tensor],
    max_tokens: int,
    pad_id: int = 0,
) -> PackedRows:
    """Pack E examples into N rows of at most ``max_tokens`` tokens, first fit in input order.

    Each example goes into the first row it fits in, else a new row; within a row examples keep
    input order. Deterministic: the layout depends only on the lengths and ``max_tokens``. An
    example is never split across rows (its second half would lose the context of its first),
    so one longer than ``max_tokens`` is a ValueError: cut it at load time (``max_length``).
    T is the fullest row's length, <= ``max_tokens``.
    """
    lengths = _check(ids_L, spans_L)
    rows: list[list[int]] = []  # example indices per row
    free: list[int] = []  # tokens left per row
    for e, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"example {e} has {n} tokens, more than max_tokens={max_tokens}")
        r = next((r for r, left in enumerate(free) if left >= n), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(max_tokens)
        rows[r].append(e)
        free[r] -= n
    width = max_tokens - min(free)
    shape = (len(rows), width)
    ids_NT = torch.full(shape, pad_id, dtype=torch.long)
    spans_NT = torch.full(shape, int(Span.PAD), dtype=torch.int8)
    position_ids_NT = torch.zeros(shape, dtype=torch.long)
    example_ids_NT = torch.full(shape, -1, dtype=torch.long)
    for r, members in enumerate(rows):
        t = 0
        for e in members:
            n = lengths[e]
            ids_NT[r, t : t + n] = ids_L[e]
            spans_NT[r, t : t + n] = spans_L[e]
            position_ids_NT[r, t : t + n] = torch.arange(n)
            example_ids_NT[r, t : t + n] = e
            t += n
        position_ids_NT[r, t:] = torch.arange(width - t)  # padding: a block of its own
    return PackedRows(ids_NT, spans_NT, position_ids_NT, example_ids_NT)


def pad_examples(
    ids_L: Sequence[torch.Tensor], spans_L: Sequence[torch.Tensor], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One example per row, right-padded: ids_NT [E, T] long and spans_NT [E, T] int8 (PAD after
    each example), T the longest example. Attend with ``spans_NT != Span.PAD``."""
    lengths = _check(ids_L, spans_L)
    ids_NT = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
    spans_NT = torch.full(ids_NT.shape, int(Span.PAD), dtype=torch.int8)
    for e, n in enumerate(lengths):
        ids_NT[e, :n] = ids_L[e]
        spans_NT[e, :n] = spans_L[e]
    return ids_NT, spans_NT


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as ids [N, P] long, left-padded with ``pad_id``, and their 0/1 mask
    [N, P] long: the layout ``generate`` continues and a prompt table has."""
    width = max(map(len, rows))
    ids_NP = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask_NP = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids_NP[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask_NP[i, width - len(row) :] = 1
    return ids_NP, mask_NP


def block_causal_mask(
    example_ids_NT: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[N, 1, T, T] mask: query t sees key s <= t of the same example (padding, id -1, forms a
    block of its own, so no query row is fully masked and softmax never sees all -inf).

    ``dtype`` float (the default; use the model's compute dtype): additive, 0 where allowed and
    the dtype's min elsewhere, right for both eager and sdpa attention. ``torch.bool``: True where
    allowed, right for sdpa only (eager adds the mask to its scores). Memory is N x T x T
    elements (a 4,096-token row in float32 is 64 MiB), fine for the tiny model and short rows;
    flash-attention's varlen kernels take position ids instead and need no such mask.
    """
    t = example_ids_NT.shape[1]
    same_NTT = example_ids_NT[:, :, None] == example_ids_NT[:, None, :]
    causal_TT = torch.ones(t, t, dtype=torch.bool, device=example_ids_NT.device).tril()
    allowed_N1TT = (same_NTT & causal_TT)[:, None]
    if dtype == torch.bool:
        return allowed_N1TT
    zeros = torch.zeros(allowed_N1TT.shape, dtype=dtype, device=example_ids_NT.device)
    return zeros.masked_fill(~allowed_N1TT, torch.finfo(dtype).min)


def scored_targets(spans_NT: torch.Tensor, example_ids_NT: torch.Tensor) -> torch.Tensor:
    """[N, T - 1] bool: logits at t score a trained token, i.e. token t + 1 is TRAINED and in
    the same example as token t (``example_ids_NT`` from packing, or ``zeros_like`` padded)."""
    same_example = example_ids_NT[:, 1:] == example_ids_NT[:, :-1]
    return same_example & (spans_NT[:, 1:] == Span.TRAINED)


def example_sums(
    values_NT: torch.Tensor, example_ids_NT: torch.Tensor, mask_NT: torch.Tensor, num_examples: int
) -> torch.Tensor:
    """[E] per-example sums of ``values_NT`` over ``mask_NT`` (e.g. the sequence logprob of each
    DPO side from per-token logprobs). The three [N, T] tensors must be aligned (for targets:
    ``example_ids_NT[:, 1:]`` with :func:`scored_targets`'s mask)."""
    sums_E = torch.zeros(num_examples, dtype=values_NT.dtype, device=values_NT.device)
    return sums_E.index_add(0, example_ids_NT[mask_NT], values_NT[mask_NT])


def pack_episodes(
    prompt_ids_NP: torch.Tensor,
    prompt_mask_NP: torch.Tensor,
    episode_ids_NT: torch.Tensor,
    episode_spans_NT: torch.Tensor,
    pad_id: int = 0,
) -> tuple[PackedRows, torch.Tensor]:
    """A :class:`~dist_ft.wire.batch.ScoredBatch`'s rows (left-padded prompts, right-padded
    episodes) packed for one forward: each row's real tokens, prompt then episode, are one example.

    Examples go in longest first (first-fit decreasing packs tighter than input order) into
    rows of at most the longest example's length: a packed row is never longer than the padded
    rows the batch would otherwise need, so attention cost and activation memory per row do not
    grow; only the row count drops.

    Returns the packed rows and source_NT [N, T] long: for each real episode token, the flat
    index into the packed [R x T'] grid of the token before it (whose logits score it), -1 on
    padding. Every row with episode tokens needs a prompt token: an example's first token has
    no token before it in its own block.
    """
    real_NP = prompt_mask_NP.bool()
    real_NT = episode_spans_NT != Span.PAD
    prompt_len_N = real_NP.sum(-1)
    length_N = prompt_len_N + real_NT.sum(-1)
    if bool(((prompt_len_N == 0) & (length_N > 0)).any()):
        raise ValueError("a row has episode tokens but no prompt token to score the first from")
    order_E = torch.argsort(length_N, descending=True, stable=True)  # example e is row order[e]
    ids_E, spans_E = [], []
    for n in order_E.tolist():
        ids_E.append(torch.cat([prompt_ids_NP[n][real_NP[n]], episode_ids_NT[n][real_NT[n]]]))
        prompt_spans = torch.full((int(prompt_len_N[n]),), int(Span.CONTEXT), dtype=torch.int8)
        spans_E.append(torch.cat([prompt_spans, episode_spans_NT[n][real_NT[n]].to(torch.int8)]))
    packed = pack_examples(ids_E, spans_E, int(length_N.max()), pad_id)
    # Flat grid positions grouped by example, in row order within each (padding, id -1, first):
    # example e's k-th token sits at flat_pos[pads + start_E[e] + k].
    flat_pos = torch.argsort(packed.example_ids_NT.flatten(), stable=True)
    pads = int((packed.example_ids_NT < 0).sum())
    lengths_E = length_N[order_E]
    start_E = lengths_E.cumsum(0) - lengths_E
    start_N = torch.empty_like(start_E)
    start_N[order_E] = start_E
    # the j-th real episode token of row n is token prompt_len_N[n] + j of its example
    rank_NT = real_NT.long().cumsum(-1) - 1
    at_NT = (pads + start_N + prompt_len_N)[:, None] + rank_NT
    source_NT = torch.where(real_NT, flat_pos[at_NT.clamp(min=0)] - 1, -1)
    return packed, source_NT
