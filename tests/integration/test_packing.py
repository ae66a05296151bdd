"""Packed rows on the real tiny Llama: with the block-diagonal mask and restarting positions,
every example scores as it does alone; without the block mask, attention leaks across examples.
Then the same through a real Learner (DeepSpeed): packed SFT and DPO steps equal padded ones.

Shapes as in dist_ft/packing.py: E examples, N packed rows of T tokens.
"""

from dataclasses import replace

import pytest
import torch
from support import build, dpo_batch

from dist_ft.algos.common import token_logprobs
from dist_ft.data import prepare_sft
from dist_ft.learner import Learner
from dist_ft.model.loading import load_tokenizer
from dist_ft.model.logprobs import packed_completion_logprobs
from dist_ft.recipes.sft_dpo import make_batch
from dist_ft.wire.batch import Span
from dist_ft.wire.packing import (
    block_causal_mask,
    example_sums,
    pack_episodes,
    pack_examples,
    scored_targets,
)

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


# ------------------------------------------------------------------ the learner's packed forward
#
# Learner._logprobs packs SFT and DPO micro-batches (learner.pack, on by default): the batch's
# rows, prompt then episode with padding dropped, go through one forward as packed rows
# (packing.pack_episodes) and the logprobs come back in the batch's [N, T] layout, so every
# loss is computed as before. The tests below compare it with the padded forward on the same
# real Learner (pack=False).

# Mixed lengths, and a multi-turn row whose episode holds a CONTEXT turn between two TRAINED
# ones (the completion-only mask must keep it out of the loss).
LEARNER_ROWS = [
    *ROWS,
    {
        "messages": [
            {"role": "user", "content": "count"},
            {"role": "assistant", "content": "one two"},
            {"role": "user", "content": "and then?"},
            {"role": "assistant", "content": "three"},
        ]
    },
    {"prompt": "Repeat e:", "completion": "eeeeeeee"},
]


@pytest.fixture(scope="module")
def learner_examples(tiny_path):
    tok = load_tokenizer(tiny_path)
    prepared = prepare_sft(
        LEARNER_ROWS, tok, source="rows", template="plain", plain_template="{prompt}"
    )
    return prepared.examples, tok.pad_token_id


@pytest.fixture(scope="module")
def sft_batch(learner_examples):
    examples, pad_id = learner_examples
    return make_batch([[e] for e in examples], pad_id)


def learner(tiny_path, *overrides, **spec):
    _, _, lk = build(tiny_path, "algo.prompts_per_step=4", *overrides)
    return Learner(replace(lk, **spec))


def loss_and_grads(learner, objective, batch, normaliser):
    """One micro-batch's ``objective`` loss as the learner computes it, and its gradient by name
    for every trainable parameter. DeepSpeed owns backward (it refuses a bare autograd call); at
    ZeRO-0 with one micro-batch the gradients it leaves are the loss's own, cleared after."""
    learner.engine.train()
    loss, _ = learner.micro_loss(batch, objective, normaliser)
    learner.engine.backward(loss)
    named = learner.module.named_parameters()
    grads = {n: p.grad.detach().clone() for n, p in named if p.requires_grad}
    learner.engine.zero_grad()
    return loss.detach(), grads


def test_pack_episodes_puts_each_token_where_its_scorer_reads_it(sft_batch):
    prompt_ids_NP, prompt_mask_NP = sft_batch.sample_prompts()
    packed, source_NT = pack_episodes(
        prompt_ids_NP, prompt_mask_NP, sft_batch.episode_ids, sft_batch.episode_mask
    )
    real_NT = sft_batch.attention_mask
    assert torch.equal(source_NT >= 0, real_NT)
    assert len(packed.ids_NT) < len(sft_batch)  # some rows really share a packed row
    # the token after each source position is the episode token it scores, same example
    ids_flat, spans_flat = packed.ids_NT.flatten(), packed.spans_NT.flatten()
    examples_flat = packed.example_ids_NT.flatten()
    target = source_NT[real_NT] + 1
    assert torch.equal(ids_flat[target], sft_batch.episode_ids[real_NT].long())
    assert torch.equal(spans_flat[target], sft_batch.episode_mask[real_NT])
    assert torch.equal(examples_flat[target], examples_flat[source_NT[real_NT]])
    # no packed row is longer than the longest example (the padded batch's own width)
    lengths_N = prompt_mask_NP.sum(-1) + real_NT.sum(-1)
    assert packed.ids_NT.shape[1] == int(lengths_N.max())
    no_prompt_NP = torch.zeros_like(prompt_mask_NP)
    with pytest.raises(ValueError, match="no prompt token"):
        pack_episodes(prompt_ids_NP, no_prompt_NP, sft_batch.episode_ids, sft_batch.episode_mask)


def test_packed_sft_and_dpo_equal_padded_loss_and_gradients(tiny_path, sft_batch):
    """Full fine-tuning, every parameter's gradient: the SFT loss (its step's normaliser), the
    DPO loss, the reference pass's logprobs and a whole optimizer step agree packed and padded."""
    dpo = dpo_batch(tiny_path, 4)
    sft_norm = float(sft_batch.loss_mask.sum())
    out = {}
    for pack in (False, True):
        lrn = learner(tiny_path, "peft.method=none", pack=pack)
        assert lrn.pack is pack
        out[pack] = (
            loss_and_grads(lrn, "sft", sft_batch, sft_norm),
            loss_and_grads(lrn, "dpo", dpo, 4.0),
            lrn.logprobs(sft_batch),
            lrn.step(sft_batch, "sft")["loss"],
            lrn.export_weights(),
        )
    (sft, dpo_out, logp, step_loss, weights), padded = out[True], out[False]
    for (loss, grads), (loss0, grads0) in [(sft, padded[0]), (dpo_out, padded[1])]:
        torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
        assert grads.keys() == grads0.keys()
        assert all(g.abs().sum() > 0 for g in grads.values())  # full fine-tuning: every one
        for name, g in grads.items():
            torch.testing.assert_close(g, grads0[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(logp, padded[2], rtol=0, atol=1e-5)
    assert step_loss == pytest.approx(padded[3], rel=1e-6)
    assert step_loss == pytest.approx(float(sft[0]))  # the step's loss is the micro-batch's
    for name, w in weights.items():
        # Adam normalises: a float-rounding gradient difference moves a near-zero update
        torch.testing.assert_close(w, padded[4][name], rtol=1e-4, atol=5e-5)


def test_packed_steps_under_zero3_lora_equal_padded(tiny_path, sft_batch):
    """LoRA (peft passes position ids and the 4D mask through) on ZeRO-3 (the engine gathers
    each layer's partition in the packed forward): two SFT steps, as many micro-batches as
    rows allow, reach the padded run's loss, gradient norm and weights."""
    out = {}
    for pack in (False, True):
        lrn = learner(tiny_path, pack=pack, zero_stage=3, micro_batches=2)
        assert all(p.numel() == 0 for p in lrn.module.parameters())  # really partitioned
        metrics = [lrn.step(sft_batch, "sft") for _ in range(2)]
        out[pack] = metrics, lrn.export_weights()
    for m, m0 in zip(out[True][0], out[False][0]):
        assert m["loss"] == pytest.approx(m0["loss"], rel=1e-6)
        assert m["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-4)
    assert out[True][0][1]["grad_norm"] > 0  # LoRA's A moves from the second step on
    for name, w in out[True][1].items():
        torch.testing.assert_close(w, out[False][1][name], rtol=1e-4, atol=1e-6)


def test_prefix_tuning_keeps_the_padded_forward(tiny_path, sft_batch):
    """peft's prefix tuning concatenates its prefix columns to the attention mask as if 2D, so
    a packed forward fails there: the learner runs prefix padded even with pack on."""
    lrn = learner(tiny_path, "peft.method=prefix", pack=True)
    assert lrn.pack is False
    with pytest.raises(RuntimeError, match="same number of dimensions"):
        packed_completion_logprobs(
            lrn.module, *sft_batch.sample_prompts(), sft_batch.episode_ids, sft_batch.episode_mask
        )
    assert lrn.step(sft_batch, "sft")["loss"] > 0


def test_packed_examples_do_not_see_each_other_and_only_trained_tokens_count(
    tiny_path, learner_examples, sft_batch
):
    """Negative control: changing one example's tokens changes its own logprobs and no other
    example's, also those packed in the same row after it. And the loss is the NLL of the
    TRAINED tokens alone (the multi-turn row's CONTEXT turn left out), each example scored
    as if alone."""
    examples, pad_id = learner_examples
    lrn = learner(tiny_path, "peft.method=none", pack=True)
    prompt_ids_NP, prompt_mask_NP = sft_batch.sample_prompts()
    packed, _ = pack_episodes(
        prompt_ids_NP, prompt_mask_NP, sft_batch.episode_ids, sft_batch.episode_mask
    )
    # the order pack_episodes packs in (longest first): example e of the layout is row order[e]
    lengths_N = prompt_mask_NP.sum(-1) + sft_batch.attention_mask.sum(-1)
    order = torch.argsort(lengths_N, descending=True, stable=True).tolist()
    shared = next(r for r in packed.example_ids_NT if len(set(r.tolist()) - {-1}) > 1)
    first, *after = [order[e] for e in dict.fromkeys(shared.tolist()) if e >= 0]
    assert after  # examples packed after the one changed, in its row: where a leak would show

    before = lrn.logprobs(sft_batch)
    changed = make_batch([[e] for e in examples], pad_id)
    real = changed.attention_mask[first]
    changed.episode_ids[first, real] = (changed.episode_ids[first, real] + 7) % 100
    after_change = lrn.logprobs(changed)
    assert not torch.allclose(after_change[first], before[first], atol=1e-3)
    others = [n for n in range(len(sft_batch)) if n != first]
    torch.testing.assert_close(after_change[others], before[others], rtol=0, atol=1e-6)

    multi = next(i for i, e in enumerate(examples) if len(e.spans.unique_consecutive()) > 2)
    assert (sft_batch.episode_mask[multi] == Span.CONTEXT).any()
    alone = alone_logprobs(lrn.module, examples)
    trained = [a[e.spans[1:] == Span.TRAINED] for a, e in zip(alone, examples)]
    nll = -float(torch.cat(trained).sum()) / sum(len(t) for t in trained)
    assert lrn.step(sft_batch, "sft")["loss"] == pytest.approx(nll, rel=1e-5)
