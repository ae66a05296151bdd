"""HFGenerator alone on the tiny model: its behaviour logprobs against the learner's function."""

from dataclasses import replace

import pytest
import torch
from support import build

from dist_ft.cluster.local import LocalCluster
from dist_ft.model.logprobs import completion_logprobs, group_logprobs
from dist_ft.model.spec import PeftSpec
from dist_ft.rollout.base import GeneratorSpec
from dist_ft.rollout.hf import HFGenerator, HFOptions, InverseCDFSample

# Unequal lengths (left padding), one a single token (its shared-prefill row is all padding).
PROMPTS = ["Repeat c:", "a", "Repeat the letter q, please:"]


def generator(tiny_path: str, dtype: str, merge_lora: bool = True) -> HFGenerator:
    spec = GeneratorSpec(tiny_path, dtype, PeftSpec(r=8, alpha=16), "cpu", 12, 0.7, 0.9, False)
    gen = HFGenerator(replace(spec, options=HFOptions(merge_lora=merge_lora)))
    with torch.no_grad():  # an adapter away from its no-op init: the logprobs depend on it
        for name, p in gen.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return gen


def full_forward_logprobs(gen: HFGenerator, out) -> torch.Tensor:
    """Every sample's [prompt + completion] through the model in one uncached forward."""
    mask_NT = (out.episode_mask != 0).long()
    with torch.no_grad():
        lp_NT = completion_logprobs(
            gen.model,
            out.prompt_ids[out.group_ids],
            out.prompt_mask[out.group_ids],
            out.episode_ids,
            mask_NT,
            gen.temperature,
        )
    return (lp_NT * mask_NT).float()


def learner_logprobs(gen: HFGenerator, out) -> torch.Tensor:
    """What the learner computes on the batch: each group's prompt once (Learner._logprobs)."""
    mask_NT = (out.episode_mask != 0).long()
    with torch.no_grad():
        lp_NT = group_logprobs(
            gen.model,
            out.prompt_ids,
            out.prompt_mask,
            out.group_ids,
            out.episode_ids,
            mask_NT,
            gen.temperature,
        )
    return (lp_NT * mask_NT).float()


def test_fp32_logprobs_from_the_sampling_pass_match_a_full_forward(tiny_path):
    """The KV-cached decode (prompt prefilled once per group) gives the full forward's logprobs:
    measured max 7e-6 per token here, 3e-5 on SmolLM2-135M."""
    gen = generator(tiny_path, "float32")
    assert gen.logprobs_from_sampling and gen.shared_prefill
    assert gen.merged is not None  # decoding through the merged weights (rollout.merge_lora)
    torch.manual_seed(0)
    out = gen.generate(PROMPTS, 4)
    m = out.episode_mask != 0
    assert (out.logprobs[m] < 0).all() and (out.logprobs[~m] == 0).all()
    torch.testing.assert_close(out.logprobs, full_forward_logprobs(gen, out), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.logprobs, learner_logprobs(gen, out), atol=1e-4, rtol=0)
    # each prompt's cache was repeated, not shared: its G samples differ
    assert len(set(out.texts[:4])) > 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_logprobs_come_from_the_learners_function(tiny_path, dtype):
    # a cached decode in bf16 is off the full forward by up to 0.23 per token (SmolLM2)
    gen = generator(tiny_path, dtype)
    assert not gen.logprobs_from_sampling
    torch.manual_seed(0)
    out = gen.generate(PROMPTS, 2)
    assert torch.equal(out.logprobs, learner_logprobs(gen, out))


def test_the_inverse_cdf_sampler_draws_the_softmax_distribution():
    """generate samples through InverseCDFSample (greedy over its draw); 20,000 rows of one
    distribution must land on each token as often as softmax says (4 sigma), never on a token
    of probability 0, and leave exactly one finite score per row."""
    torch.manual_seed(0)
    scores = torch.tensor([[0.0, 1.0, -1.0, float("-inf"), 2.0, -3.0]]).repeat(20_000, 1)
    out = InverseCDFSample()(None, scores)
    assert (torch.isfinite(out).sum(-1) == 1).all()
    freq = torch.bincount(out.argmax(-1), minlength=6) / len(out)
    p = torch.softmax(scores[0], -1)
    sigma = (p * (1 - p) / len(out)).sqrt()
    assert ((freq - p).abs() <= 4 * sigma + 1e-12).all(), (freq, p)
    assert freq[3] == 0


def lora_calls(gen: HFGenerator) -> int:
    """How many times peft runs a LoRA factor during one generate."""
    calls = [0]
    hooks = [
        m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        for name, m in gen.model.named_modules()
        if name.endswith("lora_A.default")
    ]
    gen.generate(PROMPTS, 2)
    for h in hooks:
        h.remove()
    return calls[0]


def test_merged_decode_adds_no_lora_update_and_leaves_the_base_bit_exact(tiny_path):
    gen = generator(tiny_path, "float32")
    layers = gen.merged.layers
    start = [m.base_layer.weight.detach().clone() for m in layers]
    assert lora_calls(gen) == 0  # the update is in the weights
    assert lora_calls(generator(tiny_path, "float32", merge_lora=False)) > 0
    # inside decoding: W0 + scaling * B @ A exactly; outside: W0, bit for bit
    with gen.merged.decoding():
        for m, w0 in zip(layers, start):
            assert torch.equal(m.base_layer.weight, w0 + m.get_delta_weight("default"))
    for m, w0 in zip(layers, start):
        assert torch.equal(m.base_layer.weight, w0) and not m.merged
    # a sync (an in-place write of the adapter) is seen at the next decode, from W0 again
    update = {k: v + 0.01 for k, v in gen.export_weights().items()}
    gen.load_weights(update)
    torch.manual_seed(0)
    out = gen.generate(PROMPTS, 4)
    torch.testing.assert_close(out.logprobs, learner_logprobs(gen, out), atol=1e-4, rtol=0)
    with gen.merged.decoding():
        for m, w0 in zip(layers, start):
            assert torch.equal(m.base_layer.weight, w0 + m.get_delta_weight("default"))
    assert all(torch.equal(m.base_layer.weight, w0) for m, w0 in zip(layers, start))


def test_low_precision_decodes_without_merging(tiny_path):
    # a bf16 weight would round a small update away; bf16 scores its samples in a second pass
    assert generator(tiny_path, "bfloat16").merged is None


def test_debug_mode_workers_hold_the_learners_frozen_base_and_stay_on_policy(
    tiny_path, demo_prompts
):
    _, wk, lk = build(tiny_path, "algo.prompts_per_step=4")
    cluster = LocalCluster(wk, lk)
    gen = cluster.workers[0].generator
    theirs = dict(cluster.learner.module.named_parameters())
    frozen = {n: p for n, p in gen.model.named_parameters() if not p.requires_grad}
    # every frozen tensor is the learner's storage, the adapted layers' W0 included
    assert frozen and all(p.data_ptr() == theirs[n].data_ptr() for n, p in frozen.items())
    assert gen.merged is not None and len(gen.merged.layers) > 0
    start = {n: p.detach().clone() for n, p in frozen.items()}
    for step in range(3):  # each rollout after a sync decodes through freshly merged weights
        batch = cluster.collect(cluster.submit_rollout(step, demo_prompts[4 * step : 4 * step + 4]))
        # no merged copy is held while the learner trains: it lives only inside a decode
        assert gen.merged.merged == [None] * len(gen.merged.layers), step
        metrics = cluster.train_step(batch, "grpo")
        assert abs(metrics["ratio"] - 1.0) < 1e-5, step
        cluster.sync_weights()
    # the merged weights were written to buffers of their own, never to the learner's base
    assert all(torch.equal(theirs[n], w) for n, w in start.items())
