"""The sample payload: prompts once per group, explicit group ids, a trainable-span mask.

Shapes as in dist_ft/batch.py: N samples, Bg groups, P prompt tokens, T episode tokens, K reward
functions. The gradient tests use the real tiny model through the real ``Learner`` loss path.
"""

import pytest
import torch
from support import build

from dist_ft.algos.common import group_slots
from dist_ft.algos.grpo import advantages_by_group, group_advantages
from dist_ft.learner import Learner
from dist_ft.model.loading import load_tokenizer
from dist_ft.wire.batch import ScoredBatch, Span


def hand_batch(prompts: list[list[int]], group_N: list[int], episodes: list[list[int]], step=1):
    """A batch built by hand: ``prompts`` [Bg] token lists (left-padded here), ``episodes`` [N]
    token lists (right-padded, all TRAINED), sample i continuing prompt ``group_N[i]``."""
    p = max(len(x) for x in prompts)
    t = max(len(x) for x in episodes)
    n, k = len(episodes), 2
    prompt_ids = torch.tensor([[0] * (p - len(x)) + x for x in prompts], dtype=torch.int32)
    prompt_mask = torch.tensor([[False] * (p - len(x)) + [True] * len(x) for x in prompts])
    episode_ids = torch.tensor([x + [0] * (t - len(x)) for x in episodes], dtype=torch.int32)
    lengths = torch.tensor([len(x) for x in episodes])
    trained = torch.arange(t) < lengths[:, None]
    slot = group_slots(torch.tensor(group_N))
    return ScoredBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        group_ids=torch.tensor(group_N, dtype=torch.int32),
        episode_ids=episode_ids,
        episode_mask=(trained * Span.TRAINED).to(torch.int8),
        logprobs=-torch.rand(n, t) * trained,
        rewards=torch.rand(n, k),
        reward_total=torch.rand(n),
        advantages=torch.randn(n),
        sample_ids=torch.stack(
            [torch.full((n,), step), torch.tensor(group_N) + 100 * step, slot], dim=1
        ).int(),
        versions=torch.full((n,), step, dtype=torch.int32),
        reward_names=["a", "b"],
    )


def per_sample(batch: ScoredBatch) -> list[tuple[list[int], list[int], tuple[int, ...]]]:
    """Each sample's real prompt tokens, real episode tokens and id: independent of padding,
    of the prompt table's order and of how group ids are numbered."""
    prompt_ids, prompt_mask = batch.sample_prompts()
    return [
        (
            prompt_ids[i][prompt_mask[i]].tolist(),
            batch.episode_ids[i][batch.attention_mask[i]].tolist(),
            tuple(batch.sample_ids[i].tolist()),
        )
        for i in range(len(batch))
    ]


def two_workers() -> tuple[ScoredBatch, ScoredBatch]:
    # Worker A: 2 groups of 3, its rows interleaved; worker B: 1 group of 3, a longer prompt.
    a = hand_batch([[5, 6], [7, 8, 9]], [0, 1, 0, 1, 0, 1], [[1], [2, 3], [4], [5], [6, 7], [8]])
    b = hand_batch([[10, 11, 12, 13, 14]], [0, 0, 0], [[1, 2, 3, 4], [5], [6, 7]], step=2)
    return a, b


def test_concat_offsets_group_ids_and_select_keeps_prompts_consistent():
    a, b = two_workers()
    merged = ScoredBatch.concat([a, b])
    assert merged.prompt_ids.shape == (3, 5)  # 3 groups, re-padded to the longest prompt
    assert merged.group_ids.tolist() == [0, 1, 0, 1, 0, 1, 2, 2, 2]
    assert per_sample(merged) == per_sample(a) + per_sample(b)

    index = [7, 1, 3, 8]  # two samples of B's group and two of A's second group
    picked = merged.select(index)
    assert per_sample(picked) == [per_sample(merged)[i] for i in index]
    # only the referenced prompts travel on, once each, renumbered in their original order
    assert picked.prompt_ids.shape[0] == 2
    assert picked.group_ids.tolist() == [1, 0, 0, 1]
    # selecting again, and concatenating selections, compose
    again = ScoredBatch.concat([picked.select([2, 3]), merged.select([0])])
    assert per_sample(again) == [per_sample(merged)[i] for i in (3, 8, 0)]


def test_group_ids_must_index_the_prompt_table():
    a, _ = two_workers()
    with pytest.raises(ValueError, match="group_ids must index the 2 prompt rows"):
        ScoredBatch(**{**vars(a), "group_ids": a.group_ids + 1})
    with pytest.raises(ValueError, match="prompt_mask has 1 rows, expected 2"):
        ScoredBatch(**{**vars(a), "prompt_mask": a.prompt_mask[:1]})


def test_nbytes_counts_the_prompt_once_per_group():
    # Bg=2 groups of G=3, P=3, T=4, K=2, no reference logprobs.
    batch = hand_batch([[5, 6, 7], [8]], [0, 0, 0, 1, 1, 1], [[1, 2, 3, 4]] * 6)
    assert batch.prompt_ids.shape == (2, 3) and batch.episode_ids.shape == (6, 4)
    prompts = 2 * 3 * 4 + 2 * 3 * 1  # int32 ids + bool mask, per group: 30
    tokens = 6 * 4 * (4 + 1 + 4)  # int32 ids + int8 span codes + float32 logprobs: 216
    per_row = 4 + 2 * 4 + 4 + 4 + 3 * 4 + 4 + 2 + 1  # group id, K rewards, total, advantage,
    # (step, prompt, completion) id, version, K error flags, valid: 39
    assert batch.nbytes == prompts + tokens + 6 * per_row == 480
    assert ScoredBatch.bytes_per_sample(3, 4, 2, ref=False, group_size=3) == 480 // 6
    # group_size=1 bounds any grouping (the prompt counted once per sample)
    assert ScoredBatch.bytes_per_sample(3, 4, 2, ref=False) == 480 // 6 + 10


def test_a_batch_crosses_the_wire_as_raw_buffers_and_arrives_whole():
    """Pickled (Ray's path) as numpy buffers, not through torch.save per tensor (the driver's
    main cost at 64 workers, bench/fleet_scaling.py); it arrives equal, with writable tensors
    even from read-only buffers (Ray's object store hands those out; the ledger writes)."""
    import pickle

    import numpy as np

    a, _ = two_workers()
    a.ref_logprobs = a.logprobs[:, :1].expand(-1, a.logprobs.shape[1])  # non-contiguous
    data = pickle.dumps(a, protocol=5)
    assert b"torch._utils" not in data and b"_load_from_bytes" not in data
    state = a.__getstate__()
    for v in state.values():
        if isinstance(v, np.ndarray):
            v.setflags(write=False)
    for b in (pickle.loads(data), ScoredBatch.__new__(ScoredBatch)):
        if not b.__dict__:
            b.__setstate__(state)
        for name, t in vars(a).items():
            got = getattr(b, name)
            if isinstance(t, torch.Tensor):
                assert got.dtype == t.dtype and torch.equal(got, t), name
            else:
                assert got == t, name
        b.valid[0] = False  # writable
    assert bool(a.valid[0]) and not state["valid"].flags.writeable


def test_advantages_follow_group_ids_not_row_order():
    rewards_BG = torch.tensor([[1.0, 0.0, 3.0], [2.0, 2.5, -1.0]])
    expected_BG = group_advantages(rewards_BG)
    order = torch.tensor([3, 0, 4, 1, 5, 2])  # rows interleaved across the two groups
    group_N = order // 3
    assert group_slots(group_N).tolist() == [0, 0, 1, 1, 2, 2]
    got = advantages_by_group(rewards_BG.reshape(-1)[order], group_N)
    torch.testing.assert_close(got, expected_BG.reshape(-1)[order])
    # a short group: its missing slot enters no statistics
    short = advantages_by_group(
        torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0]), torch.tensor([0, 0, 1, 1, 1])
    )
    torch.testing.assert_close(short[:2], group_advantages(torch.tensor([[1.0, 3.0]]))[0])
    torch.testing.assert_close(short[2:], group_advantages(torch.tensor([[5.0, 7.0, 9.0]]))[0])


# ---------------------------------------------------------------- multi-turn through the learner
MODEL, ENV = Span.TRAINED, Span.CONTEXT


@pytest.fixture(scope="module")
def multi_turn(tiny_path):
    """A full fine-tuning learner and one group of two samples: sample 0 is multi-turn (model
    span, env span, model span), sample 1 single-turn and shorter (right padding)."""
    _, _, lk = build(tiny_path, "peft.method=none")
    learner = Learner(lk)
    tok = load_tokenizer(tiny_path)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    prompt = ids("Repeat c:")
    spans = [(ids("cc"), MODEL), (ids(" tool: c!\n"), ENV), (ids("cc"), MODEL)]
    episode0 = [t for toks, _ in spans for t in toks]
    codes0 = [code for toks, code in spans for _ in toks]
    episode1 = ids("ccc")
    t = len(episode0)
    batch = hand_batch([prompt], [0, 0], [episode0, episode1])
    batch.episode_mask[0] = torch.tensor(codes0, dtype=torch.int8)
    batch.advantages = torch.tensor([1.0, -0.5])
    # Behaviour logprobs: the model's own, nudged off-policy (within the clip range) on the
    # trained tokens; 0 elsewhere, as a generator writes them.
    with torch.no_grad():
        ref = reference_logprobs(learner, prompt, [episode0, episode1])
    noise = torch.linspace(-0.1, 0.1, t)
    batch.logprobs = torch.stack([torch.cat([r, torch.zeros(t - len(r))]) for r in ref]) + noise
    batch.logprobs = batch.logprobs * batch.trainable_mask
    return learner, prompt, [episode0, episode1], batch


def reference_logprobs(learner: Learner, prompt: list[int], episodes: list[list[int]]):
    """Each episode token's logprob, one unpadded sequence at a time, straight from the model."""
    out = []
    for episode in episodes:
        ids = torch.tensor([prompt + episode])
        logits = learner.module(input_ids=ids).logits[0] / learner.spec.temperature
        logp = logits.float().log_softmax(-1)[len(prompt) - 1 : -1]
        out.append(logp.gather(-1, torch.tensor(episode)[:, None]).squeeze(-1))
    return out


def grads(learner: Learner, loss: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of ``loss`` through DeepSpeed's own backward (it refuses a bare autograd call),
    cleared again so the next call starts from zero; no optimizer step."""
    learner.engine.backward(loss)
    params = [p for p in learner.module.parameters() if p.requires_grad]
    out = [p.grad.detach().clone() for p in params]
    learner.engine.zero_grad()
    return out


def loss_and_grads(learner: Learner, batch: ScoredBatch):
    loss, _ = learner.micro_loss(batch, "grpo", float(len(batch)))  # GRPO: mean over samples
    return loss.detach(), grads(learner, loss)


def test_env_span_gets_no_gradient_and_the_loss_is_the_model_spans_alone(multi_turn):
    learner, prompt, episodes, batch = multi_turn
    env = batch.episode_mask == ENV
    assert env.sum() > 0 and env[0].any() and not env[1].any()
    loss, grads_l = loss_and_grads(learner, batch)
    assert all(g.abs().sum() > 0 for g in grads_l[:1])  # the embeddings do get a gradient

    # Behaviour logprobs on the env span are meaningless: garbage there changes nothing.
    perturbed = batch.select(range(len(batch)))
    perturbed.logprobs = torch.where(env, torch.randn_like(batch.logprobs) * 5, batch.logprobs)
    loss_p, grads_p = loss_and_grads(learner, perturbed)
    assert torch.equal(loss_p, loss)
    assert all(torch.equal(a, b) for a, b in zip(grads_p, grads_l))

    # Hand-computed reference: the forward conditions on every token (env included), the GRPO
    # loss is the per-sample mean over the model's tokens only, then the mean over samples.
    lo, hi = 1 - learner.spec.loss.eps_low, 1 + learner.spec.loss.eps_high
    total = torch.zeros(())
    for i, logp in enumerate(reference_logprobs(learner, prompt, episodes)):
        trained = batch.trainable_mask[i, : len(logp)]
        ratio = torch.exp(logp[trained] - batch.logprobs[i, : len(logp)][trained])
        adv = batch.advantages[i]
        surrogate = torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv)
        total = total - surrogate.mean()
    expected = total / len(episodes)
    torch.testing.assert_close(loss, expected.detach(), atol=1e-6, rtol=1e-5)
    for got, want in zip(grads_l, grads(learner, expected)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)

    # Control: the same tokens with the env span marked trained give another loss.
    trained_env = batch.select(range(len(batch)))
    trained_env.episode_mask = torch.where(
        env, torch.tensor(MODEL, dtype=torch.int8), batch.episode_mask
    )
    assert not torch.allclose(loss_and_grads(learner, trained_env)[0], loss)


def test_env_span_is_attended_to(multi_turn):
    """Dropping the env tokens from the sequence changes the later model span's logprobs: the
    forward conditions on them even though they carry no loss."""
    learner, _, _, batch = multi_turn
    cut = batch.select([0])
    cut.episode_mask = torch.where(
        cut.episode_mask == ENV, torch.tensor(Span.PAD, dtype=torch.int8), cut.episode_mask
    )
    assert cut.num_tokens == batch.select([0]).num_tokens  # the same trained tokens
    assert not torch.allclose(
        loss_and_grads(learner, cut)[0], loss_and_grads(learner, batch.select([0]))[0]
    )
