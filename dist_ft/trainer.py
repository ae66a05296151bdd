"""The GRPO loop: ``train(cfg)``, read top to bottom. Debug mode and Ray run this same code."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from dist_ft.algos.grpo import LossParams, loss_normaliser
from dist_ft.cluster import make_cluster
from dist_ft.config import Config, config_to_dict
from dist_ft.data import (
    PromptSampler,
    demo_format_rows,
    encode_pairs,
    load_rows,
    prepare_prompts,
    render,
)
from dist_ft.models import load_tokenizer, resolve_model_path
from dist_ft.tracking import Tracker


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("resources.device=cuda but no CUDA device is visible")
    return device


def component_kwargs(cfg: Config, model_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Plain constructor arguments for RolloutWorker and Learner: the config tree stops here."""
    device = resolve_device(cfg.resources.device)
    common = {
        "model_path": model_path,
        "dtype": cfg.model.dtype,
        "peft": cfg.peft,
        "device": device,
        "seed": cfg.run.seed,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    worker = {
        **common,
        "group_size": cfg.rollout.group_size,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "temperature": cfg.rollout.temperature,
        "top_p": cfg.rollout.top_p,
        "rewards": [(f.name, f.weight, f.kwargs) for f in cfg.reward.functions],
        "scale_rewards": cfg.algo.scale_rewards,
        "need_ref_logprobs": cfg.algo.beta > 0,
    }
    learner = {
        **common,
        "loss": loss_params(cfg),
        "temperature": cfg.rollout.temperature,
        "lr": cfg.learner.lr,
        "weight_decay": cfg.learner.weight_decay,
        "grad_clip": cfg.learner.grad_clip,
        "zero_stage": cfg.learner.zero_stage,
        "offload": cfg.learner.offload,
        "samples_per_step": cfg.samples_per_step,
        "micro_batches": cfg.learner.micro_batches,
    }
    return worker, learner


def loss_params(cfg: Config) -> LossParams:
    return LossParams(
        loss_type=cfg.algo.loss,
        eps_low=cfg.algo.eps_low,
        eps_high=cfg.algo.eps_high,
        beta=cfg.algo.beta,
        max_tokens=cfg.rollout.max_new_tokens,
    )


def train(cfg: Config) -> dict[str, Any]:
    """Run GRPO for ``cfg.run.steps`` steps. Returns a summary (first/last reward, paths)."""
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)

    # ---- data: validate and render every row now, so a bad row costs no compute
    model_path = resolve_model_path(cfg.model.path, cfg.model.tiny)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    d = cfg.data
    prompts = prepare_prompts(
        load_rows(d.source, d.demo_size, cfg.run.seed),
        tokenizer,
        source=d.source,
        prompt_field=d.prompt_field,
        answer_field=d.answer_field,
        template=d.template,
        plain_template=d.plain_template,
        max_prompt_tokens=d.max_prompt_tokens,
    )
    sampler = PromptSampler(len(prompts), cfg.run.seed)

    # ---- placement: the only line that differs between debug mode and a cluster
    worker_kwargs, learner_kwargs = component_kwargs(cfg, model_path)
    res = cfg.resources
    cluster = make_cluster(
        res.mode, worker_kwargs, learner_kwargs, res.rollout_workers, res.learners, res.ray_address
    )
    (out / "placement.json").write_text(json.dumps(cluster.placement(), indent=1))
    params = loss_params(cfg)
    tracker = Tracker(
        out,
        run_name=cfg.run.name,
        total_steps=cfg.run.steps,
        wandb_mode=cfg.run.wandb,
        wandb_project=cfg.run.wandb_project,
        config=config_to_dict(cfg),
        plot=cfg.run.plot,
    )
    try:
        # ---- format warm-up (demo only): SFT on answer-shaped targets, not on the answers
        warm = demo_format_rows(cfg.algo.sft_warmup_steps * cfg.samples_per_step, cfg.run.seed)
        for i in range(0, len(warm), cfg.samples_per_step):
            rows = warm[i : i + cfg.samples_per_step]
            texts = [render(tokenizer, r["prompt"], d.template, d.plain_template) for r in rows]
            cluster.sft_step(*encode_pairs(tokenizer, texts, [r["completion"] for r in rows]))

        # ---- first sync: the workers' adapter init is random; start them from the learner's
        cluster.sync_weights()
        for step in range(1, cfg.run.steps + 1):
            # ---- generate + score: G completions per prompt, rewards, group advantages
            t0 = time.perf_counter()
            batch = cluster.rollout(
                step, [prompts[i] for i in sampler.next(cfg.algo.prompts_per_step)]
            )
            t_rollout = time.perf_counter() - t0

            # ---- train: one optimizer step; the normaliser spans the whole step's batch
            t1 = time.perf_counter()
            metrics = cluster.train_step(batch, loss_normaliser(batch.completion_mask, params))
            t_train = time.perf_counter() - t1

            # ---- sync: only what changed goes back to the workers, as version v+1
            sync = cluster.sync_weights()

            # ---- log
            metrics.update(
                {
                    f"reward/{name}": float(batch.rewards[:, k].mean())
                    for k, name in enumerate(batch.reward_names)
                },
                **{
                    "reward/mean": float(batch.reward_total.mean()),
                    "reward/std": float(batch.reward_total.std()),
                    "completion_tokens": batch.num_tokens / len(batch),
                    "payload_bytes_per_sample": batch.nbytes / len(batch),
                    "sync_bytes": sync.nbytes,
                    "sync_seconds": sync.seconds,
                    "rollout_seconds": t_rollout,
                    "train_seconds": t_train,
                    "samples_per_s": len(batch) / (t_rollout + t_train + sync.seconds),
                    "learner_tokens_per_s": metrics["tokens"] / t_train,
                    "version": sync.version,
                },
            )
            tracker.log(step, metrics)

        # ---- save: the adapter alone under PEFT (HF save_pretrained, safetensors)
        final_dir = out / ("adapter" if cfg.peft.method.value != "none" else "model")
        cluster.save_pretrained(final_dir)
    finally:
        plot = tracker.finish()
        cluster.shutdown()
    window = min(10, max(1, cfg.run.steps // 2))
    return {
        "first_reward": tracker.mean("reward/mean", first=window),
        "last_reward": tracker.mean("reward/mean", last=window),
        "window": window,
        "metrics": str(tracker.metrics_path),
        "plot": str(plot) if plot else None,
        "final": str(final_dir),
    }
