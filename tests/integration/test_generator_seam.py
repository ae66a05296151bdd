"""The Generator seam: a second engine, chosen by config, trains end to end."""

from generators import NaiveSampler
from support import build, load_learner_weights

from dist_ft.learner import Learner
from dist_ft.rollout import RolloutWorker


def test_a_second_generator_matches_the_learner_at_ratio_one(tiny_path, demo_prompts):
    # Its logprobs come from its own naive sampling loop, not from transformers' generate.
    _, wk, lk = build(
        tiny_path, "algo.prompts_per_step=4", "rollout.generator=generators:NaiveSampler"
    )
    learner = Learner(lk)
    worker = RolloutWorker(wk)
    assert isinstance(worker.generator, NaiveSampler)
    load_learner_weights(worker, learner)
    batch = worker.rollout(1, demo_prompts[:4], seed=0)
    m = batch.trainable_mask
    assert (batch.logprobs[m] < 0).all() and (batch.logprobs[~m] == 0).all()
    metrics = learner.step(batch)
    assert abs(metrics["ratio"] - 1.0) < 1e-5


def test_a_second_generator_trains_end_to_end_through_config(tmp_path):
    from dist_ft.config import load_config
    from dist_ft.recipes.grpo import train

    cfg = load_config(
        None,
        [
            "rollout.generator=generators:NaiveSampler",
            "run.steps=3",
            "grpo.sft_warmup_steps=0",
            "run.wandb=disabled",
            "run.plot=false",
            f"run.output_dir={tmp_path}",
        ],
    )
    before = NaiveSampler.calls
    summary = train(cfg)
    assert NaiveSampler.calls - before == 3  # one rollout per step, all through the config's engine
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3
    assert summary["lost_samples"] == 0
