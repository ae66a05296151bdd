"""Real DeepSpeed engines (world size 1, gloo) on the tiny model; no mocks."""

from dataclasses import replace

import pytest
import torch
from support import assert_adam_close, build

from dist_ft.cluster import LocalCluster
from dist_ft.data import encode_pairs
from dist_ft.learner import Learner
from dist_ft.model.loading import load_tokenizer
from dist_ft.model.weights import tied_aliases
from dist_ft.rollout import RolloutWorker
from dist_ft.sync import fingerprint
from dist_ft.wire.batch import ScoredBatch


def scored_batch(rollout_spec, prompts, n_prompts=4):
    """A real rollout, with advantages set to fixed +-1 so every step has a gradient."""
    worker = RolloutWorker(rollout_spec)
    batch = worker.rollout(1, prompts[:n_prompts], seed=0)
    batch.advantages = torch.tensor([1.0, -1.0]).repeat(len(batch) // 2)
    return batch


def snapshot(module, trainable):
    return {
        n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad == trainable
    }


def test_lora_step_changes_every_adapter_parameter_and_no_base_parameter(tiny_path, demo_prompts):
    _, wk, lk = build(tiny_path, "algo.prompts_per_step=4")
    learner = Learner(lk)
    batch = scored_batch(wk, demo_prompts)
    adapter0 = snapshot(learner.module, True)
    base0 = snapshot(learner.module, False)
    assert adapter0 and all("lora_" in n for n in adapter0)
    # LoRA's B starts at 0, so A only gets a gradient from the second step on.
    for _ in range(2):
        metrics = learner.step(batch)
    assert metrics["ratio"] != 1.0  # the second step is off-policy: the first one moved it
    unchanged = [
        n for n, p in snapshot(learner.module, True).items() if torch.equal(p, adapter0[n])
    ]
    assert unchanged == []
    changed_base = [
        n for n, p in snapshot(learner.module, False).items() if not torch.equal(p, base0[n])
    ]
    assert changed_base == []


def test_full_finetuning_step_changes_the_parameters(tiny_path, demo_prompts):
    _, wk, lk = build(tiny_path, "algo.prompts_per_step=4", "peft.method=none")
    learner = Learner(lk)
    batch = scored_batch(wk, demo_prompts)
    before = snapshot(learner.module, True)
    learner.step(batch)
    after = snapshot(learner.module, True)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert unchanged == []  # embeddings too: the batch's tokens get gradient
    # every weight travels, the tied embedding / lm_head tensor once
    state = learner.module.state_dict()
    assert set(learner.export_weights()) == set(state) - tied_aliases(state)
    assert tied_aliases(state) == {"lm_head.weight"}


def test_zero3_partitions_and_matches_zero0(tiny_path, demo_prompts):
    _, wk, lk = build(tiny_path, "algo.prompts_per_step=4")
    batch = scored_batch(wk, demo_prompts)
    results = {}
    for stage in (0, 3):
        learner = Learner(replace(lk, zero_stage=stage))
        if stage == 3:  # ZeRO-3 really partitions: outside a gather a parameter is empty
            assert all(p.numel() == 0 for p in learner.module.parameters())
        learner.step(batch)
        learner.step(batch)
        results[stage] = learner.export_weights()
    assert results[0].keys() == results[3].keys()
    for name in results[0]:
        torch.testing.assert_close(results[3][name], results[0][name], atol=1e-5, rtol=1e-4)


def test_micro_batches_give_the_same_update(tiny_path, demo_prompts):
    _, wk, lk = build(tiny_path, "algo.prompts_per_step=4")
    batch = scored_batch(wk, demo_prompts)
    out = []
    for micro in (1, 4):
        learner = Learner(replace(lk, micro_batches=micro))
        learner.step(batch)
        out.append(learner.export_weights())
    for name in out[0]:
        torch.testing.assert_close(out[1][name], out[0][name], atol=1e-5, rtol=1e-4)


def test_micro_batches_that_do_not_divide_the_batch_give_the_same_update(tiny_path, demo_prompts):
    # The ledger can drop samples (duplicates, too stale), leaving a batch the configured
    # micro-batch count does not divide: 6 rows into 4 micro-batches.
    _, wk, lk = build(tiny_path, "algo.prompts_per_step=4")
    batch = scored_batch(wk, demo_prompts).select(torch.arange(6))
    out = []
    for micro in (1, 4):
        learner = Learner(replace(lk, micro_batches=micro))
        learner.step(batch)
        learner.step(batch)
        assert learner.engine.global_steps == 2  # one optimizer step per call, no spill-over
        out.append(learner.export_weights())
    for name in out[0]:
        torch.testing.assert_close(out[1][name], out[0][name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "none"])
def test_weight_sync_fingerprints_match(tiny_path, demo_prompts, method):
    _, wk, lk = build(tiny_path, "algo.prompts_per_step=4", f"peft.method={method}")
    cluster = LocalCluster(wk, lk, num_workers=2)
    first = cluster.sync_weights()
    batch = cluster.collect(cluster.submit_rollout(1, demo_prompts[:4]))
    batch.advantages = torch.tensor([1.0, -1.0]).repeat(len(batch) // 2)
    cluster.train_step(batch, "grpo")
    second = cluster.sync_weights()
    assert second.version == first.version + 1
    learner_print = fingerprint(cluster.learner.export_weights())
    assert all(w.fingerprint() == learner_print for w in cluster.workers)
    assert all(w.version == second.version for w in cluster.workers)
    trainable = sum(
        p.numel() * p.element_size() for p in cluster.learner.module.parameters() if p.requires_grad
    )
    if method == "lora":  # the adapter alone travels
        assert second.nbytes == trainable
    else:
        assert second.nbytes >= trainable


def test_sft_objective_is_the_token_mean_nll_of_the_targets(tiny_path, demo_prompts):
    """The SFT objective through the same Learner.step: the loss it reports equals the NLL of
    the target tokens computed independently from the model's logits, averaged over the
    step's target tokens; and 4 micro-batches (of 6 rows) give the same update as 1."""
    _, _, lk = build(tiny_path, "algo.prompts_per_step=4")
    tok = load_tokenizer(tiny_path)
    prompts = [p.text for p in demo_prompts[:6]]
    targets = ["b", "cc", "ddd", "ffff", "g", "hh"]  # unequal lengths: token mean != row mean
    batch = ScoredBatch.supervised(*encode_pairs(tok, prompts, targets))
    out = []
    for micro in (1, 4):
        learner = Learner(replace(lk, micro_batches=micro))
        nll, n = 0.0, 0
        with torch.no_grad():
            for p, t in zip(prompts, targets):
                ids = tok(p + t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                logits = learner.module(input_ids=torch.tensor([ids])).logits[0].float()
                start = len(tok(p, add_special_tokens=False)["input_ids"])
                logp = logits[start - 1 : -1].log_softmax(-1)
                target = torch.tensor(ids[start:])
                nll -= float(logp.gather(-1, target[:, None]).sum())
                n += len(target)
        metrics = learner.step(batch, "sft")
        assert n == int(batch.loss_mask.sum())  # targets + EOS
        assert metrics["loss"] == pytest.approx(nll / n, rel=1e-5)
        out.append(learner.export_weights())
    for name in out[0]:
        torch.testing.assert_close(out[1][name], out[0][name], atol=1e-5, rtol=1e-4)


def test_a_groups_prompt_runs_once_and_the_update_equals_the_padded_forwards(
    tiny_path, demo_prompts
):
    """model.logprobs.group_logprobs: each prompt through the model once, its KV cache indexed
    out to its G samples. Counted at the embedding (the tokens the model ran) and checked
    against the padded forward that runs every sample's own prompt copy: same logprobs, same
    two updates."""
    _, wk, lk = build(tiny_path, "algo.prompts_per_step=4", "rollout.group_size=4")
    batch = scored_batch(wk, demo_prompts)
    shared, padded = Learner(lk), Learner(lk)
    padded.share_prompts = False
    tokens = []
    embed = shared.module.get_input_embeddings()
    hook = embed.register_forward_hook(lambda m, args, out: tokens.append(args[0].numel()))
    with torch.no_grad():
        width = int(batch.attention_mask.any(0).nonzero().max()) + 1
        lp_shared = shared._logprobs(batch, width, 1.0, pack=False)
        lp_padded = padded._logprobs(batch, width, 1.0, pack=False)
    hook.remove()
    n, groups, p = len(batch), *batch.prompt_ids.shape
    assert n == 4 * groups and width > 1
    # the prompt table once, then each sample's completion but its last token; the padded
    # forward ran n * (p + width)
    assert tokens == [groups * p, n * (width - 1)]
    mask = batch.attention_mask[:, :width].bool()
    torch.testing.assert_close(lp_shared[mask], lp_padded[mask], atol=1e-5, rtol=0)
    for _ in range(2):
        shared.step(batch)
        padded.step(batch)
    a, b = snapshot(shared.module, True), snapshot(padded.module, True)
    assert a.keys() == b.keys() and a
    # two summation orders: Adam-eps-sized gradients may move apart (support.assert_adam_close)
    for name in a:
        assert_adam_close(a[name], b[name], lk.lr, name)
