"""RolloutWorker on the tiny model: real HF generate, real peft."""

from dataclasses import replace

import torch
from support import build, load_learner_weights

from dist_ft.learner import Learner
from dist_ft.model.loading import load_policy
from dist_ft.model.logprobs import completion_logprobs
from dist_ft.model.spec import PeftMethod, PeftSpec
from dist_ft.rollout import RolloutWorker


def test_scored_batch_shapes_ids_and_masks(tiny_path, demo_prompts):
    cfg, wk, _ = build(tiny_path, "rollout.group_size=4", "rollout.max_new_tokens=6")
    worker = RolloutWorker(wk)
    batch = worker.rollout(7, demo_prompts[:3], seed=0)
    n = 3 * 4
    assert len(batch) == n
    t = batch.episode_ids.shape[1]
    assert batch.episode_ids.shape == batch.episode_mask.shape == batch.logprobs.shape == (n, t)
    # trimmed to the longest completion: no column is padding in every row, none past the budget
    assert t <= 6 and batch.trainable_mask[:, -1].any()
    # the prompt travels once per group; group ids say which samples share it
    assert batch.prompt_ids.shape[0] == batch.prompt_mask.shape[0] == 3
    assert batch.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert batch.rewards.shape == (n, len(cfg.reward.functions))
    assert batch.reward_names == ["char_match", "exact_match"]
    assert batch.sample_ids[:, 0].eq(7).all()
    assert batch.sample_ids[:4, 1].eq(demo_prompts[0].index).all()
    assert batch.sample_ids[:4, 2].tolist() == [0, 1, 2, 3]
    assert batch.versions.eq(0).all()
    # single-turn: every existing token was sampled and is trained (no context span)
    assert torch.equal(batch.attention_mask, batch.trainable_mask)
    # logprobs are real log-probabilities on real tokens and exactly 0 on padding
    m = batch.trainable_mask
    assert (batch.logprobs[m] < 0).all() and (batch.logprobs[~m] == 0).all()
    # advantages are group-relative: zero mean within each group
    torch.testing.assert_close(
        batch.advantages.view(3, 4).sum(-1), torch.zeros(3), atol=1e-5, rtol=0
    )
    # what travels: ids, masks, logprobs, rewards; no weights (a few hundred bytes per sample)
    assert batch.nbytes < 40 * 6 * n


def test_behaviour_logprobs_match_the_learner(tiny_path, demo_prompts):
    """On-policy, the learner's recomputed logprobs give an importance ratio of exactly ~1."""
    _, wk, lk = build(tiny_path, "algo.prompts_per_step=4")
    learner = Learner(lk)
    worker = RolloutWorker(wk)
    load_learner_weights(worker, learner)
    batch = worker.rollout(1, demo_prompts[:4], seed=0)
    metrics = learner.step(batch)
    assert abs(metrics["ratio"] - 1.0) < 1e-5


def test_reference_logprobs_use_the_base_model_without_a_copy(tiny_path, demo_prompts):
    _, wk, _ = build(tiny_path, "grpo.beta=0.05")
    worker = RolloutWorker(wk)
    assert worker.generator.ref_model is None  # LoRA: the adapter is switched off instead
    # move the adapter away from its no-op init so policy and reference differ
    with torch.no_grad():
        for name, p in worker.generator.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = worker.rollout(1, demo_prompts[:2], seed=0)
    base = load_policy(
        tiny_path, "float32", PeftSpec(method=PeftMethod.NONE), torch.device("cpu")
    ).eval()
    with torch.no_grad():
        expected = completion_logprobs(
            base, *batch.sample_prompts(), batch.episode_ids, batch.attention_mask
        )
    m = batch.trainable_mask
    torch.testing.assert_close(batch.ref_logprobs[m], expected[m], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch.logprobs[m], batch.ref_logprobs[m], atol=1e-3)


def test_completion_is_masked_after_eos(tiny_path):
    _, wk, _ = build(tiny_path, "rollout.max_new_tokens=5")
    worker = RolloutWorker(wk)
    eos, pad = worker.generator.tokenizer.eos_token_id, worker.generator.tokenizer.pad_token_id
    # generate stops early only once every row has ended; later tokens are junk or padding
    generated = torch.tensor([[10, eos, 11, 12], [10, 11, 12, eos]])
    ids, mask = worker.generator._completion(generated)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]  # not padded to max_new_tokens
    assert ids.tolist() == [[10, eos, pad, pad], [10, 11, 12, eos]]
    # a completion cut at max_new_tokens without EOS is kept whole
    ids, mask = worker.generator._completion(torch.tensor([[10, 11, 12, 13, 14]]))
    assert mask.tolist() == [[1, 1, 1, 1, 1]]


def test_group_judge_compares_the_samples_of_each_group(tiny_path, demo_prompts):
    """The worker hands the judge its generator's group ids: each group's scores sum to 1."""
    from pathlib import Path

    from dist_ft.rewards.judge import JudgeSpec, JudgeWorker

    constitution = Path(__file__).resolve().parents[2] / "configs/constitutions/default.yaml"
    judge = JudgeWorker(
        JudgeSpec(model_path=tiny_path, constitution=str(constitution), mode="group")
    )
    _, wk, _ = build(tiny_path, "rollout.group_size=4", "rollout.max_new_tokens=4")
    worker = RolloutWorker(
        replace(wk, rewards=[("judge", 1.0, {})], reward_tasks=[[]]), judge=judge
    )
    batch = worker.rollout(1, demo_prompts[:3], seed=0)
    sums = torch.zeros(3).index_add_(0, batch.group_ids.long(), batch.rewards[:, 0])
    torch.testing.assert_close(sums, torch.ones(3), atol=1e-5, rtol=0)
    assert batch.counters["judge/requests"] == 3  # one judge query per group
