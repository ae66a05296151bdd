"""Packed rows on the real tiny Llama: with the block-diagonal mask and restarting positions,
every example scores as it does alone; without the block mask, attention leaks across examples.

Shapes as in dist_ft/packing.py: E examples, N packed rows of T tokens.
"""

import pytest
import torch

from dist_ft.algos.common import token_logprobs
from dist_ft.data import prepare_sft
from dist_ft.models import load_tokenizer
from dist_ft.packing import block_causal_mask, example_sums, pack_examples, scored_targets

ROWS = [
    {"prompt": "Repeat c:", "completion": "cccc"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"prompt": "Repeat d:", "completion": "dd"},
    {"prompt": "Say something longer, please:", "completion": "something longer"},
    {"prompt": "x", "completion": "y"},
]
# The examples are 14, 11, 12, 46 and 3 tokens: first fit packs [0, 1, 2, 4] (40 tokens, 6 of
# padding) and [3] (46) into T = 46.
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def examples(tiny_path):
    prepared = prepare_sft(
        ROWS, load_tokenizer(tiny_path), source="rows", template="plain", plain_template="{prompt}"
    )
    return prepared.examples


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation=request.param).eval()


@pytest.fixture(scope="module")
def packed(examples):
    packed = pack_examples([e.ids for e in examples], [e.spans for e in examples], MAX_TOKENS)
    layout = [[0] * 14 + [1] * 11 + [2] * 12 + [4] * 3 + [-1] * 6, [3] * 46]
    assert packed.example_ids_NT.tolist() == layout
    return packed


@torch.no_grad()
def alone_logprobs(model, examples):
    """[L - 1] per example: the logprob of each token after the first, the example run alone."""
    out = []
    for e in examples:
        ids_1L = e.ids[None].long()
        out.append(token_logprobs(model(input_ids=ids_1L).logits[:, :-1], ids_1L[:, 1:])[0])
    return out


@torch.no_grad()
def packed_logprobs(model, packed, num_examples, **forward):
    """Per example, the same [L - 1] logprobs read off the packed rows' forward."""
    ids_NT = packed.ids_NT
    logp_NT1 = token_logprobs(model(input_ids=ids_NT, **forward).logits[:, :-1], ids_NT[:, 1:])
    # Targets inside one example: token t + 1 scored from token t of the same example.
    same = packed.example_ids_NT[:, 1:] == packed.example_ids_NT[:, :-1]
    return [logp_NT1[same & (packed.example_ids_NT[:, 1:] == e)] for e in range(num_examples)]


def test_packed_examples_score_as_if_alone(model, examples, packed):
    alone = alone_logprobs(model, examples)
    mask = block_causal_mask(packed.example_ids_NT, dtype=model.dtype)
    got = packed_logprobs(
        model, packed, len(examples), attention_mask=mask, position_ids=packed.position_ids_NT
    )
    for e, (a, g) in enumerate(zip(alone, got)):
        assert g.shape == a.shape, e
        torch.testing.assert_close(g, a, atol=1e-5, rtol=0, msg=f"example {e}")
    # The DPO read-out: per-example sums of trained-token logprobs, from the packed forward.
    ids_NT = packed.ids_NT
    with torch.no_grad():
        logits = model(input_ids=ids_NT, attention_mask=mask, position_ids=packed.position_ids_NT)
    logp_NT1 = token_logprobs(logits.logits[:, :-1], ids_NT[:, 1:])
    scored_NT1 = scored_targets(packed.spans_NT, packed.example_ids_NT)
    sums_E = example_sums(logp_NT1, packed.example_ids_NT[:, 1:], scored_NT1, len(examples))
    expected_E = torch.stack(
        [a[e.spans[1:] == 2].sum() for a, e in zip(alone, examples)]  # 2: Span.TRAINED
    )
    torch.testing.assert_close(sums_E, expected_E, atol=1e-4, rtol=0)


def without_blocks(packed, dtype):
    """Forward kwargs that pack without isolating examples: each a way to get it wrong."""
    n, t = packed.ids_NT.shape
    causal = torch.zeros(n, 1, t, t, dtype=dtype).masked_fill(
        ~torch.ones(t, t, dtype=torch.bool).tril(), torch.finfo(dtype).min
    )
    positions = packed.position_ids_NT
    return {
        # A plain causal 4D mask: positions restart, but attention spans the row.
        "causal_4d": dict(attention_mask=causal, position_ids=positions),
        # The learner's 2D padding mask: transformers skips packed-sequence detection with it.
        "mask_2d": dict(attention_mask=packed.example_ids_NT >= 0, position_ids=positions),
        # Restarting positions alone: detection is skipped too, because use_cache defaults to
        # True and a plain forward builds an (empty) cache.
        "positions_only": dict(position_ids=positions),
    }


@pytest.mark.parametrize("variant", ["causal_4d", "mask_2d", "positions_only"])
def test_without_the_block_mask_examples_leak(model, examples, packed, variant):
    alone = alone_logprobs(model, examples)
    got = packed_logprobs(
        model, packed, len(examples), **without_blocks(packed, model.dtype)[variant]
    )
    firsts = {int(row[0]) for row in packed.example_ids_NT}  # nothing before them to leak
    for e, (a, g) in enumerate(zip(alone, got)):
        gap = float((g - a).abs().max())
        if e in firsts:
            assert gap < 1e-5, (e, gap)
        else:
            assert gap > 1e-2, (e, gap)


def test_bool_mask_is_wrong_for_eager_attention(model, examples, packed):
    """transformers' eager attention adds the 4D mask to its scores: a bool mask there adds 1.0
    where allowed and 0.0 where not, masking nothing (sdpa takes it as a real bool mask)."""
    allowed = block_causal_mask(packed.example_ids_NT, dtype=torch.bool)
    alone = alone_logprobs(model, examples)
    got = packed_logprobs(
        model, packed, len(examples), attention_mask=allowed, position_ids=packed.position_ids_NT
    )
    gap = max(float((g - a).abs().max()) for a, g in zip(alone, got))
    if model.config._attn_implementation == "eager":
        assert gap > 1e-2
    else:
        assert gap < 1e-5
