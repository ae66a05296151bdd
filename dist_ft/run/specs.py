"""The one bridge from the config tree to the frozen specs that workers are built from."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dist_ft.algos.settings import LossParams
from dist_ft.cluster import Cluster, make_cluster
from dist_ft.cluster.placement import ActorSpec
from dist_ft.config import Config
from dist_ft.learner import LearnerSpec
from dist_ft.model.loading import resolve_model_path
from dist_ft.model.spec import Device, auto_lr
from dist_ft.rewards.judge import JudgeSpec
from dist_ft.rollout import GeneratorSpec, RolloutSpec
from dist_ft.rollout.episodes import ENV_REWARD, EnvSpec
from dist_ft.rollout.hf import HFOptions


def resolve_device(device: str) -> Device:
    """``resources.device`` resolved: "auto" is cuda when a GPU is visible, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("resources.device=cuda but no CUDA device is visible")
        return "cuda"
    if device == "cpu":
        return "cpu"
    raise ValueError(f"resources.device={device!r}: one of auto, cpu, cuda")


def judge_spec(cfg: Config) -> JudgeSpec | None:
    """What the RLAIF judge is built from when a reward function is the judge, else None."""
    if not any(f.name == "judge" for f in cfg.reward.functions):
        return None
    j = cfg.reward.judge
    return JudgeSpec(
        model_path=resolve_model_path(j.model.path, j.model.tiny),
        constitution=j.constitution,
        mode=j.mode,
        ratings=tuple(j.ratings),
        template=j.template or None,
        device=resolve_device(cfg.resources.device),
        dtype=j.model.dtype,
        batch_size=j.batch_size,
        trust_remote_code=j.model.trust_remote_code,
    )


def cluster_for(
    cfg: Config, rollout: RolloutSpec, learner: LearnerSpec, rollout_workers: int | None = None
) -> Cluster:
    """The run's cluster (``resources.mode``): its actors and judge from the config, the weight
    transport from ``resources.weight_transport``. ``rollout_workers`` overrides the count (0:
    a run that never samples)."""
    actors = actor_spec(cfg, learner.device == "cuda")
    if rollout_workers is not None:
        actors = dataclasses.replace(actors, rollout_workers=rollout_workers, colocate=False)
    return make_cluster(
        rollout, learner, cfg.resources, actors, judge_spec(cfg), cfg.rollout.read_back_every
    )


def reward_columns(cfg: Config) -> list[tuple[str, float, dict[str, Any], list[str]]]:
    """(name, weight, kwargs, tasks) of each reward column: ``reward.functions``, then under
    ``env.name`` the environment's return, logged, weighted and error-handled as one more."""
    columns = [(f.name, f.weight, dict(f.kwargs), list(f.tasks)) for f in cfg.reward.functions]
    if cfg.env.name is not None:
        columns.append((ENV_REWARD, cfg.env.reward_weight, {}, []))
    return columns


def component_specs(cfg: Config, model_path: str) -> tuple[RolloutSpec, LearnerSpec]:
    """What rollout workers and learners are built from: the config tree stops here."""
    device = resolve_device(cfg.resources.device)
    columns = reward_columns(cfg)
    rollout = RolloutSpec(
        generation=GeneratorSpec(
            model_path=model_path,
            dtype=cfg.model.dtype if cfg.rollout.dtype == "auto" else cfg.rollout.dtype,
            peft=cfg.peft,
            device=device,
            max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            need_ref_logprobs=cfg.grpo.beta > 0,
            trust_remote_code=cfg.model.trust_remote_code,
            options=engine_options(cfg),
        ),
        generator=cfg.rollout.generator,
        group_size=cfg.rollout.group_size,
        rewards=[(name, weight, kwargs) for name, weight, kwargs, _ in columns],
        reward_tasks=[tasks for *_, tasks in columns],
        reward_timeout_s=cfg.reward.timeout_s,
        on_reward_error=cfg.reward.on_error,
        scale_rewards=cfg.grpo.scale_rewards,
        advantage=cfg.grpo.advantage,
        seed=cfg.run.seed,
        deterministic=cfg.run.deterministic,
        env=None
        if cfg.env.name is None
        else EnvSpec(
            name=cfg.env.name,
            kwargs=dict(cfg.env.kwargs),
            max_turns=cfg.env.max_turns,
            max_episode_tokens=cfg.env.max_episode_tokens,
            timeout_s=cfg.env.timeout_s,
        ),
    )
    learner = LearnerSpec(
        model_path=model_path,
        dtype=cfg.model.dtype,
        peft=cfg.peft,
        device=device,
        loss=loss_params(cfg),
        temperature=cfg.rollout.temperature,
        lr=auto_lr(cfg.peft.method) if cfg.learner.lr == "auto" else cfg.learner.lr,
        weight_decay=cfg.learner.weight_decay,
        grad_clip=cfg.learner.grad_clip,
        zero_stage=cfg.learner.zero_stage,
        offload=cfg.learner.offload,
        samples_per_step=cfg.samples_per_step,
        micro_batches=cfg.learner.micro_batches,
        seed=cfg.run.seed,
        trust_remote_code=cfg.model.trust_remote_code,
        deterministic=cfg.run.deterministic,
        dpo=cfg.dpo,
        pack=cfg.learner.pack,
        cpu_linear=cfg.resources.cpu_linear,
    )
    return rollout, learner


def engine_options(cfg: Config) -> object | None:
    """The built-in engine's own settings (``GeneratorSpec.options``); a user's engine gets None."""
    if cfg.rollout.generator == "hf":
        return HFOptions(cfg.resources.cpu_linear, cfg.rollout.merge_lora)
    if cfg.rollout.generator == "vllm":
        return cfg.rollout.vllm
    return None


def loss_params(cfg: Config) -> LossParams:
    return LossParams(
        loss_type=cfg.grpo.loss,
        eps_low=cfg.grpo.eps_low,
        eps_high=cfg.grpo.eps_high,
        beta=cfg.grpo.beta,
        max_tokens=cfg.rollout.max_new_tokens,
        behaviour=cfg.algo.behaviour_logprobs,
        tis_cap=cfg.algo.tis_cap,
    )


def actor_spec(cfg: Config, gpu: bool) -> ActorSpec:
    """The placement inputs of a config: ``resources.*`` plus the RLAIF judge actors (none
    unless a reward function is the judge); ``gpu``: whether the run trains on CUDA."""
    res = cfg.resources
    judges = cfg.reward.judge.actors if any(f.name == "judge" for f in cfg.reward.functions) else 0
    return ActorSpec(
        res.rollout_workers,
        res.learners,
        judges,
        res.rollout_cpus,
        res.rollout_gpus,
        res.learner_cpus,
        res.learner_gpus,
        res.colocate,
        gpu,
        res.min_rollout_workers,
        res.max_rollout_workers,
    )
