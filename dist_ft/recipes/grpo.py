"""The GRPO loop: ``train(cfg)``, read top to bottom. Debug mode and Ray run this same code."""

from __future__ import annotations

import collections
import random
import time
from pathlib import Path
from typing import Any

import torch

from dist_ft.algos.grpo import check_mismatch
from dist_ft.cluster import Cluster, PendingRollout, SyncStats
from dist_ft.config import Config, ConfigError
from dist_ft.data import PromptSampler, encode_pairs, render
from dist_ft.model.loading import load_tokenizer, resolve_model_path
from dist_ft.rewards import RewardError, applies, task_mismatch
from dist_ft.run import runstatus
from dist_ft.run.ledger import Ledger
from dist_ft.run.lifecycle import (
    checkpoint_due,
    open_checkpoint,
    restore_driver_rng,
    stop_run,
    write_checkpoint,
)
from dist_ft.run.outputs import keep_rejects, prepare_output_dir, write_placement
from dist_ft.run.runstatus import RunStatus
from dist_ft.run.samplers import AdapterSampler, adapter_rows, load_prompts, make_sampler
from dist_ft.run.specs import cluster_for, component_specs, reward_columns
from dist_ft.run.tracking import Tracker, finish_tracking, make_tracker
from dist_ft.tasks import demo_format_rows
from dist_ft.wire.batch import ScoredBatch

TASK_METRIC = "reward/task/"  # + a task name: its mean total reward, when the data has several


def train(cfg: Config) -> dict[str, Any]:
    """Run GRPO for ``cfg.run.steps`` steps. Returns a summary (first/last reward, paths)."""
    out = prepare_output_dir(cfg)
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    torch.use_deterministic_algorithms(cfg.run.deterministic)
    a = cfg.grpo

    # ---- data: validate and render every row now, so a bad row costs no compute
    model_path = resolve_model_path(cfg.model.path, cfg.model.tiny)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    d = cfg.data
    prepared = load_prompts(cfg, tokenizer)
    prompts = prepared.prompts
    keep_rejects(out, d.source, prepared.rejects)
    task_of = {p.index: p.task for p in prompts}  # dataset row -> its task
    columns = reward_columns(cfg)
    names, reward_tasks = [c[0] for c in columns], [c[3] for c in columns]
    if mismatch := task_mismatch(names, reward_tasks, set(task_of.values()), d.source):
        raise ConfigError(mismatch, keys=("reward.functions", "data.source"))
    sampler = make_sampler(cfg, prompts)

    # ---- resume: refuse a checkpoint of another recipe before any compute is spent
    ckpt, state, run_tensors = open_checkpoint(cfg, out)
    ledger = Ledger(
        out / "ledger.jsonl",
        cfg.rollout.group_size,
        fresh=ckpt is None,
        adapters=list(cfg.peft.adapters),
    )

    # ---- placement: the only line that differs between debug mode and a cluster
    rollout_spec, learner_spec = component_specs(cfg, model_path)
    cluster = cluster_for(cfg, rollout_spec, learner_spec)
    write_placement(out, cluster)
    tracker = make_tracker(cfg, out, state, breakdown=TASK_METRIC)
    watch = RewardWatch(
        names,
        cfg.reward.max_error_rate,
        cfg.reward.error_patience,
        state.get("error_streak", 0),
    )
    final_dir = out / ("adapter" if cfg.peft.method.value != "none" else "model")
    done = state.get("step", 0)  # the last step trained: what a Ctrl-C keeps
    pending: collections.deque[PendingRollout] = collections.deque()
    status = RunStatus(out, done, cfg.run.steps)
    status.handle_signals()

    def checkpoint_now() -> None:  # of the last step trained, when a signal stops the run
        save_checkpoint(cfg, cluster, done, sampler, ledger, tracker, pending, watch.streak)

    try:
        if ckpt is not None:
            # ---- resume: learner state, data cursor, ledger, RNG, rollouts already generated
            pending.extend(restore_checkpoint(ckpt, state, run_tensors, cluster, sampler, ledger))
        else:
            # ---- format warm-up (demo only): SFT on answer-shaped targets, not on the answers
            n_warm = a.sft_warmup_steps * cfg.samples_per_step  # 0 unless data.source is built in
            warm = demo_format_rows(n_warm, cfg.run.seed, d.source) if n_warm else []
            for i in range(0, len(warm), cfg.samples_per_step):
                # peft.adapters: each adapter warms up on its own tasks' rows
                for adapter, rows in adapter_rows(cfg, warm[i : i + cfg.samples_per_step]):
                    texts = [
                        render(tokenizer, r["prompt"], d.template, d.plain_template) for r in rows
                    ]
                    pairs = encode_pairs(tokenizer, texts, [r["completion"] for r in rows])
                    batch = ScoredBatch.supervised(*pairs)
                    if adapter is not None:
                        batch.adapter_ids = torch.full((len(batch),), adapter, dtype=torch.int8)
                    cluster.train_step(batch, "sft")

        # ---- first sync: the workers' adapter init is random; start them from the learner's
        version = cluster.sync_weights().version
        start = state.get("step", 0) + 1
        next_issue = start + len(pending)
        for step in range(start, cfg.run.steps + 1):
            # the driver process's CPU this step, its Ray threads included: the control plane's
            # cost (bench/fleet_scaling.py); in debug mode it holds generation and training too
            t_step, cpu_step = time.perf_counter(), time.process_time()
            # ---- generate + score: G completions per prompt, rewards, group advantages.
            # Async: keep up to max_staleness later steps in flight, generating while we train.
            while next_issue <= min(step + a.max_staleness, cfg.run.steps):
                chosen = [prompts[i] for i in sampler.next(cfg.algo.prompts_per_step)]
                ledger.issue(next_issue, [p.index for p in chosen])
                t_issue = time.perf_counter()
                pending.append(cluster.submit_rollout(next_issue, chosen))
                pending[-1].issue_seconds = time.perf_counter() - t_issue
                next_issue += 1
            # popped once collected: a checkpoint written on SIGTERM meanwhile still holds it
            t0, batch = time.perf_counter(), cluster.collect(pending[0])
            issued = pending.popleft()
            # at-least-once delivery and the staleness bound are enforced here, per sample id
            batch, ledger_stats = ledger.admit(batch, version, a.max_staleness)
            t_rollout = time.perf_counter() - t0 + issued.issue_seconds

            # ---- from the update to the checkpoint, a SIGTERM/Ctrl-C waits for the step's end
            with status.step():
                # ---- train: one optimizer step; the learner group normalises over the step
                t1 = time.perf_counter()
                metrics = cluster.train_step(batch, "grpo")
                ledger.record(step, batch, version)
                t_train = time.perf_counter() - t1
                done = step

                # ---- sync: only what changed goes back to the workers, as version v+1
                sync = cluster.sync_weights()
                version = sync.version

                # ---- log, then stop if the rewards keep failing rather than shrink batches
                row = step_metrics(
                    metrics, batch, ledger_stats, sync, t_rollout, t_train, task_of, reward_tasks
                )
                row.update(cluster.fleet_stats())
                if any(row.get(f"fleet/{k}") for k in ("joins", "losses", "drained")):
                    write_placement(out, cluster)  # where the fleet is now
                row["driver_cpu_seconds"] = time.process_time() - cpu_step
                row["step_seconds"] = time.perf_counter() - t_step
                tracker.log(step, row)
                tracker.log_samples(step, batch, tokenizer, prompts)
                watch.check(step, batch)
                check_mismatch(row, cfg.algo.max_mismatch, step)  # the rollout trust check

                # ---- checkpoint: learner state and run state, atomically
                if checkpoint_due(cfg, step):
                    save_checkpoint(
                        cfg, cluster, step, sampler, ledger, tracker, pending, watch.streak
                    )
                status.update(step)

        # ---- save: the adapter alone under PEFT (HF save_pretrained, safetensors), and only
        # when every reward function worked at least once: else the weights are no result
        watch.finish(tracker.history)
        cluster.save_pretrained(final_dir)
        status.update(done, runstatus.FINISHED)
    except BaseException as e:
        stop_run(e, cfg, status, cluster, final_dir, done, checkpoint_now)
        raise
    finally:
        status.restore_signals()
        plot = finish_tracking(tracker)
        cluster.shutdown()
    window = min(10, max(1, cfg.run.steps // 2))
    return {
        "first_reward": tracker.mean("reward/mean", first=window),
        "last_reward": tracker.mean("reward/mean", last=window),
        "window": window,
        "metrics": str(tracker.metrics_path),
        "plot": str(plot) if plot else None,
        "final": str(final_dir),
        "lost_samples": len(ledger.lost(cfg.run.steps)),
    }


def step_metrics(
    learner: dict[str, float],
    batch: ScoredBatch,
    ledger_stats: dict[str, float],
    sync: SyncStats,
    t_rollout: float,
    t_train: float,
    task_of: dict[int, str],
    reward_tasks: list[list[str]],
) -> dict[str, float]:
    """One step's row of metrics.jsonl: the learner's metrics, then the rest. A reward with no
    valid value this step is left out, never NaN: a NaN would pass for a score.

    ``task_of``: dataset row -> task. A reward function's mean is over the samples of its tasks
    (``reward_tasks``); with several tasks in the data, each task's mean total reward is
    ``reward/task/<task>``."""
    metrics = dict(learner)
    tasks_N = [task_of[i] for i in batch.sample_ids[:, 1].tolist()]  # [N], by prompt row
    scored_NK = applies(reward_tasks, tasks_N) & ~batch.reward_errors  # [N, K]
    for k, name in enumerate(batch.reward_names):
        if scored_NK[:, k].any():
            metrics[f"reward/{name}"] = float(batch.rewards[scored_NK[:, k], k].mean())
        metrics[f"reward/errors/{name}"] = float(batch.reward_errors[:, k].sum())
    if len(set(task_of.values())) > 1:
        for task in sorted(set(tasks_N)):
            in_task_N = torch.tensor([t == task for t in tasks_N]) & batch.valid
            if in_task_N.any():
                metrics[TASK_METRIC + task] = float(batch.reward_total[in_task_N].mean())
    for w, (n, sec) in batch.worker_stats.items():
        metrics[f"rollout/worker{w}_samples_per_s"] = n / sec
    total = batch.reward_total[batch.valid]  # [valid samples]
    if len(total):
        metrics["reward/mean"] = float(total.mean())
    if len(total) > 1:
        metrics["reward/std"] = float(total.std())
    return {
        **metrics,
        **ledger_stats,
        **batch.counters,
        "completion_tokens": batch.num_tokens / len(batch),
        "payload_bytes_per_sample": batch.nbytes / len(batch),
        "sync_bytes": sync.nbytes,
        "sync_seconds": sync.seconds,
        "rollout_seconds": t_rollout,
        "train_seconds": t_train,
        "samples_per_s": len(batch) / (t_rollout + t_train + sync.seconds),
        "learner_tokens_per_s": learner["tokens"] / t_train,
        "version": sync.version,
    }


class RewardWatch:
    """The run's reward error policy, above each sample's (``reward.on_error``): the run stops
    with the functions' own error messages when a step has no sample left to train on, when
    more than ``max_error_rate`` of a step's samples fail for ``patience`` steps in a row, or,
    at the end, when a function never once returned a valid score (a run shorter than
    ``patience`` would otherwise exit 0 with nothing learnt)."""

    def __init__(
        self, names: list[str], max_error_rate: float, patience: int, streak: int = 0
    ) -> None:
        self.names = names
        self.max_error_rate = max_error_rate
        self.patience = patience
        self.streak = streak  # steps in a row above max_error_rate; checkpointed
        self.reasons: dict[str, str] = {}  # reward name -> its first error message

    def check(self, step: int, batch: ScoredBatch) -> None:
        for name, message in batch.reward_messages.items():
            self.reasons.setdefault(name, message)
        failed_N = batch.reward_errors.any(1)
        failing = [n for k, n in enumerate(batch.reward_names) if batch.reward_errors[:, k].any()]
        if failing and not batch.valid.any():
            raise RewardError(
                f"step {step}: no sample left to train on: {int(failed_N.sum())} of "
                f"{len(batch)} have a reward error and reward.on_error=mask leaves them out; "
                + self._why(failing)
            )
        error_rate = float(failed_N.float().mean())
        self.streak = self.streak + 1 if error_rate > self.max_error_rate else 0
        if self.streak >= self.patience:
            raise RewardError(
                f"reward functions {failing} failed on {error_rate:.0%} of step {step}'s "
                f"samples, above reward.max_error_rate={self.max_error_rate} for "
                f"{self.streak} steps in a row (reward.error_patience); " + self._why(failing)
            )

    def finish(self, history: list[dict[str, float]]) -> None:
        """``history``: every metrics row of the run, those before a resume included."""
        never = [n for n in self.names if not any(f"reward/{n}" in row for row in history)]
        if history and never:
            raise RewardError(
                f"reward functions {never} never returned a valid score in {len(history)} "
                "steps; " + self._why(never)
            )

    def _why(self, names: list[str]) -> str:
        return "; ".join(
            self.reasons.get(n, f"reward '{n}' failed (its first error is printed above)")
            for n in names
        )


def save_checkpoint(
    cfg: Config,
    cluster: Cluster,
    step: int,
    sampler: PromptSampler | AdapterSampler,
    ledger: Ledger,
    tracker: Tracker,
    pending: collections.deque[PendingRollout],
    error_streak: int,
) -> None:
    """Everything a resumed run needs to continue as if never stopped. Rollouts already in
    flight (async mode) are collected and stored: they were generated by older weights, which a
    resumed run could not reproduce."""
    batches = [cluster.collect(p) for p in pending]
    for p, b in zip(pending, batches):
        p.results = [b]  # collected: keep the batch, not the reference
    tensors = {f"worker_rng.{k}": rng for k, rng in enumerate(cluster.rng_states())}
    for p, b in zip(pending, batches):
        tensors.update(b.to_tensors(f"pending{p.step}."))
    state = {
        "sampler": sampler.state_dict(),
        "ledger": ledger.state_dict(),
        "pending_steps": [p.step for p in pending],
        "error_streak": error_streak,
        "reward_names": batches[0].reward_names if batches else [],
    }
    write_checkpoint(cfg, cluster, step, tracker, state, tensors)


def restore_checkpoint(
    ckpt: Path,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    cluster: Cluster,
    sampler: PromptSampler | AdapterSampler,
    ledger: Ledger,
) -> list[PendingRollout]:
    """The inverse of :func:`save_checkpoint`; returns the rollouts that were in flight."""
    cluster.load_state(ckpt)
    sampler.load_state_dict(state["sampler"])
    ledger.load_state_dict(state["ledger"], state["step"])
    restore_driver_rng(state, tensors)
    workers = sorted(
        (k for k in tensors if k.startswith("worker_rng.")), key=lambda k: int(k.split(".")[1])
    )
    cluster.load_rng_states([tensors[k] for k in workers])
    return [
        PendingRollout(
            step,
            [],
            [],
            [],
            [ScoredBatch.from_tensors(tensors, f"pending{step}.", state["reward_names"])],
        )
        for step in state["pending_steps"]
    ]
