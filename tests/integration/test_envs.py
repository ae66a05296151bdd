"""Multi-turn episodes on the tiny model: real HF generation, real environments in the worker.

The token rule, the loss mask and the on-policy ratio with the real "hf" engine; what a tool
call, a failing tool and a failing environment become with the scripted engine
(tests/generators.py: Scripted), since the random tiny model never writes a tool call.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from generators import Scripted
from support import build, load_learner_weights, readme_example

from dist_ft.algos.grpo import GRPO
from dist_ft.algos.objective import ObjectiveSettings
from dist_ft.envs.chat import ChatCodec
from dist_ft.learner import Learner
from dist_ft.model.logprobs import group_logprobs
from dist_ft.rewards import RewardError
from dist_ft.rollout import RolloutWorker
from dist_ft.wire.batch import Span

RELAY = ("env.name=envs_toy:Relay", "reward.functions=[]", "rollout.group_size=2")
TURN = "rollout.max_new_tokens=5"  # per model turn: 3 turns of <= 5 sampled tokens


class Spy:
    """Records what the real engine's ``sample`` returned, call by call."""

    def __init__(self, worker: RolloutWorker) -> None:
        self.calls: list[tuple[list[list[int]], list]] = []
        real = worker.generator.sample

        def sample(contexts, budgets):
            turns = real(contexts, budgets)
            self.calls.append(([list(c) for c in contexts], turns))
            return turns

        worker.generator.sample = sample


def test_episode_is_the_sampled_ids_plus_the_env_ids_token_by_token(tiny_path, demo_prompts):
    _, wk, _ = build(tiny_path, *RELAY, TURN)
    worker = RolloutWorker(wk)
    spy = Spy(worker)
    batch = worker.rollout(1, demo_prompts[:2], seed=0)
    assert len(spy.calls) == 3  # 3 turns, every live episode's turn in one call
    assert [len(contexts) for contexts, _ in spy.calls] == [4, 4, 4]
    codec = ChatCodec(worker.generator.tokenizer, [])
    eos = worker.generator.tokenizer.eos_token_id
    for i in range(4):
        expect_ids, expect_spans = [], []
        for k, (_, turns) in enumerate(spy.calls):
            sampled = turns[i].ids
            expect_ids += sampled
            expect_spans += [Span.TRAINED] * len(sampled)
            if k < 2:  # the env's answer, tokenised once, after the first two turns
                seen = [{"role": "tool", "content": f"seen {k + 1}"}]
                env_ids = codec.between(seen, bool(sampled) and sampled[-1] == eos)
                expect_ids += env_ids
                expect_spans += [Span.CONTEXT] * len(env_ids)
        n = len(expect_ids)
        assert batch.episode_ids[i, :n].tolist() == expect_ids
        assert batch.episode_mask[i, :n].tolist() == [int(s) for s in expect_spans]
        assert (batch.episode_mask[i, n:] == Span.PAD).all()
        # behaviour logprobs exactly where the policy sampled, and only there
        sampled_lp = [lp for _, turns in spy.calls for lp in turns[i].logprobs]
        assert batch.logprobs[i][batch.episode_mask[i] == Span.TRAINED].tolist() == pytest.approx(
            sampled_lp, abs=0
        )
        assert (batch.logprobs[i][batch.episode_mask[i] != Span.TRAINED] == 0).all()
        # the group's prompt is the rendered reset(), once per group
        prompt = codec.prompt([{"role": "user", "content": demo_prompts[i // 2].text}])
        row = batch.prompt_ids[batch.group_ids[i]][batch.prompt_mask[batch.group_ids[i]]]
        assert row.tolist() == prompt
    # the environment's return (a reward per turn) is the "env" column, counted in metrics
    assert batch.reward_names == ["env"]
    assert batch.counters["env/episodes"] == 4 and batch.counters["env/turns"] == 12
    assert batch.counters["env/k"] == 12 and batch.counters["env/truncated"] == 0


def test_env_and_tool_tokens_get_exactly_zero_gradient(tiny_path, demo_prompts):
    _, wk, lk = build(tiny_path, *RELAY, TURN)
    learner = Learner(lk)
    worker = RolloutWorker(wk)
    load_learner_weights(worker, learner)
    batch = worker.rollout(1, demo_prompts[:2], seed=0)
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])  # every sample weighs in the loss
    captured = {}

    def logprobs(b, temperature):
        width = b.episode_ids.shape[1]
        logp = group_logprobs(
            learner.module,
            b.prompt_ids,
            b.prompt_mask,
            b.group_ids,
            b.episode_ids[:, :width],
            b.attention_mask[:, :width],
            temperature,
        )
        logp.retain_grad()
        captured["logp"] = logp
        return logp

    objective = GRPO(ObjectiveSettings(lk.loss, lk.dpo, lk.temperature))
    loss, _ = objective.loss(logprobs, batch, normaliser=float(batch.loss_mask.sum()))
    loss.backward()
    grad = captured["logp"].grad
    context = batch.episode_mask == Span.CONTEXT
    trained = batch.episode_mask == Span.TRAINED
    assert context.sum() > 0 and trained.sum() > 0
    assert (grad[context] == 0).all()
    assert (grad[trained] != 0).all()
    # and the parameters do get a gradient, through the trained tokens
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.module.parameters())


def test_multi_turn_behaviour_logprobs_match_the_learner(tiny_path, demo_prompts):
    """Inside multi-turn episodes, on-policy, the learner's recomputed logprobs of the model's
    tokens give an importance ratio of 1 (fp32), as single-turn."""
    _, wk, lk = build(tiny_path, *RELAY, TURN, "algo.prompts_per_step=2")
    learner = Learner(lk)
    worker = RolloutWorker(wk)
    load_learner_weights(worker, learner)
    batch = worker.rollout(1, demo_prompts[:2], seed=0)
    assert (batch.episode_mask == Span.CONTEXT).any()
    recomputed = learner.logprobs(batch)  # temperature 1 = the rollout's here
    trained = batch.loss_mask
    torch.testing.assert_close(recomputed[trained], batch.logprobs[trained], atol=1e-5, rtol=0)
    metrics = learner.step(batch)
    assert abs(metrics["ratio"] - 1.0) < 1e-5


def test_reference_logprobs_cover_the_models_tokens_only(tiny_path, demo_prompts):
    _, wk, _ = build(tiny_path, *RELAY, TURN, "grpo.beta=0.05")
    batch = RolloutWorker(wk).rollout(1, demo_prompts[:2], seed=0)
    trained = batch.loss_mask
    assert batch.ref_logprobs is not None
    # LoRA starts at B = 0: the reference is the policy itself
    torch.testing.assert_close(
        batch.ref_logprobs[trained], batch.logprobs[trained], atol=1e-5, rtol=0
    )
    assert (batch.ref_logprobs[~trained] == 0).all()


SCRIPTED = (
    "env.name=envs_toy:Faulty",
    "reward.functions=[]",
    "rollout.group_size=2",
    "rollout.generator=generators:Scripted",
    "rollout.max_new_tokens=100",
    "env.timeout_s=1",
)


def scripted(tiny_path, monkeypatch, turns, *overrides):
    monkeypatch.setattr(Scripted, "turns", turns)
    _, wk, _ = build(tiny_path, *SCRIPTED, *overrides)
    return RolloutWorker(wk)


def test_a_tool_call_is_answered_with_the_tools_result(tiny_path, demo_prompts, monkeypatch):
    call = '<tool_call>{"name": "echo", "arguments": {"x": "hi"}}</tool_call>'
    worker = scripted(tiny_path, monkeypatch, [call, "done"])
    batch = worker.rollout(1, demo_prompts[:1], seed=0)
    text = worker.generator.tokenizer.decode(batch.episode_ids[0], skip_special_tokens=True)
    assert "echo hi" in text  # the tool's answer, in the episode as context
    assert batch.counters["env/tool_calls"] == 2 and batch.counters["env/errors"] == 0
    assert batch.rewards[:, 0].tolist() == [1.0, 1.0]  # the final reply ended the episodes


def test_a_malformed_tool_call_is_an_observation_not_a_crash(tiny_path, demo_prompts, monkeypatch):
    worker = scripted(tiny_path, monkeypatch, ["<tool_call>{not json</tool_call>", "done"])
    batch = worker.rollout(1, demo_prompts[:1], seed=0)
    text = worker.generator.tokenizer.decode(batch.episode_ids[0], skip_special_tokens=True)
    assert "error: tool call is not valid JSON" in text
    assert batch.counters["env/bad_tool_calls"] == 2 and batch.counters["env/errors"] == 0
    assert batch.valid.all() and batch.rewards[:, 0].tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    ("turn", "fail", "reason"),
    [
        ('<tool_call>{"name": "boom", "arguments": {"x": "a"}}</tool_call>', "", "boom on a"),
        ('<tool_call>{"name": "slow", "arguments": {"x": "a"}}</tool_call>', "", "within 1"),
        ("done", "reset", "reset failed"),
        ("done", "step", "step failed"),
    ],
    ids=["tool-raises", "tool-hangs", "reset-raises", "step-raises"],
)
@pytest.mark.parametrize("policy", ["mask", "zero", "abort"])
def test_env_failures_follow_the_reward_error_policy(
    tiny_path, demo_prompts, monkeypatch, capfd, turn, fail, reason, policy
):
    worker = scripted(
        tiny_path,
        monkeypatch,
        [turn, "done"],
        f"reward.on_error={policy}",
        f"env.kwargs={{fail: '{fail}'}}",
    )
    if policy == "abort":
        with pytest.raises(RewardError, match=reason):
            worker.rollout(1, demo_prompts[:1], seed=0)
        return
    batch = worker.rollout(1, demo_prompts[:1], seed=0)
    assert batch.counters["env/errors"] == 2 and batch.reward_errors.all()
    assert reason in batch.reward_messages["env"]
    assert batch.valid.tolist() == ([False, False] if policy == "mask" else [True, True])
    assert torch.isfinite(batch.reward_total).all() and torch.isfinite(batch.advantages).all()
    assert reason in capfd.readouterr().err  # said once, on stderr


def test_the_readme_environment_runs_in_a_worker(tiny_path, demo_prompts, tmp_path, monkeypatch):
    (tmp_path / "readme_env.py").write_text(readme_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [replace(p, row={"prompt": p.text, "answer": "7"}) for p in demo_prompts[:2]]
    _, wk, _ = build(
        tiny_path,
        "env.name=readme_env:Guess",
        "env.max_turns=3",
        "reward.functions=[]",
        "rollout.group_size=2",
        TURN,
    )
    batch = RolloutWorker(wk).rollout(1, rows, seed=0)
    assert batch.reward_names == ["env"] and batch.counters["env/episodes"] == 4
    # the tiny model never guesses 7 in 3 turns: 2 hints (-0.1 each), truncated at the third
    assert batch.counters["env/truncated"] + batch.counters.get("env/solved", 0) == 4
    assert batch.counters["env/errors"] == 0


def test_episodes_train_async_and_resume_from_a_checkpoint(tmp_path):
    """The built-in calculator environment through `dist-ft train` in debug mode, one step
    off-policy (grpo.max_staleness=1), checkpointed every step, stopped after 2 steps and
    resumed to 3: every sample trained once, each step a full set of episodes."""
    out = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).with_name("dist-ft")), "train",
        str(Path(__file__).resolve().parents[2] / "configs" / "env_calculator.yaml"),
        "rollout.max_new_tokens=6", "algo.prompts_per_step=2", "rollout.group_size=2",
        "grpo.max_staleness=1", "run.checkpoint_every=1", f"run.output_dir={out}",
        "run.wandb=disabled", "run.plot=false",
    ]  # fmt: skip
    for steps, resume in ((2, "none"), (3, "auto")):
        r = subprocess.run([*cmd, f"run.steps={steps}", f"run.resume={resume}"],
                           capture_output=True, text=True, timeout=900)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["env/episodes"] for m in metrics] == [4.0, 4.0, 4.0]
    rows = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    ids = [tuple(s[:3]) for row in rows for s in row["samples"]]
    assert len(ids) == len(set(ids)) == 3 * 2 * 2
