"""SFT and DPO: the offline objectives, on the learners, checkpoints and tracking of GRPO.

The loop reads rows, not rollouts: each step takes ``algo.prompts_per_step`` examples (SFT) or
pairs (DPO) from a resumable sampler, builds a ``ScoredBatch`` of whole sequences (prompt, then
the answer's tokens marked TRAINED) and asks the cluster for one ``train_step`` of the objective.
Training generates nothing. SFT's held-out rows that carry an answer (``data.answer_field``)
are also answered by the policy at each evaluation: only then does the cluster start rollout
workers, which receive the learner's weights by the same versioned, fingerprinted sync as GRPO's
and score their samples with ``reward.functions`` (the verifiers).

DPO's reference: before the first update the policy *is* the reference, so one pass of
``cluster.logprobs`` over every pair, before step 1, gives each pair's reference logprobs
exactly once, for every PEFT method and for full fine-tuning, with no second model copy in
memory. They are kept in ``<output_dir>/reference_logprobs.safetensors``, so a resumed run reads
them instead of recomputing them with trained weights.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dist_ft.algos.dpo import dpo_loss, sequence_logps
from dist_ft.cluster import Cluster
from dist_ft.config import Config, ConfigError
from dist_ft.data import (
    Example,
    PromptSampler,
    load_rows,
    prepare_preferences,
    prepare_prompts,
    prepare_sft,
)
from dist_ft.model.loading import load_tokenizer, resolve_model_path
from dist_ft.run.lifecycle import (
    checkpoint_due,
    open_checkpoint,
    restore_driver_rng,
    stop_run,
    write_checkpoint,
)
from dist_ft.run.outputs import keep_rejects, prepare_output_dir, write_placement
from dist_ft.run.runstatus import FINISHED, RunStatus
from dist_ft.run.specs import cluster_for, component_specs
from dist_ft.run.tracking import finish_tracking, make_tracker
from dist_ft.tasks import SOURCES, demo_rows
from dist_ft.wire.batch import ScoredBatch
from dist_ft.wire.prompt import Prompt

REFERENCE_FILE = "reference_logprobs.safetensors"


def demo_sft_rows(n: int, seed: int, source: str = "demo") -> list[dict[str, str]]:
    """A built-in letter task (``tasks.SOURCES``) as demonstrations: the prompt and its right
    answer, once to train on and once for the verifiers of the held-out evaluation."""
    return [{**r, "completion": r["answer"]} for r in demo_rows(n, seed, source)]


def demo_pair_rows(n: int, seed: int, source: str = "demo") -> list[dict[str, str]]:
    """A built-in letter task as preferences: the right answer over the same shape of answer
    with another letter (what GRPO's reward tells apart)."""
    rng = random.Random(seed)
    out = []
    for r in demo_rows(n, seed, source):
        wrong = rng.choice([c for c in "bcdfghjk" if c != r["answer"][0]])
        out.append({"prompt": r["prompt"], "chosen": r["answer"], "rejected": wrong * 4})
    return out


def load_sequences(cfg: Config, tokenizer: Any, out: Path) -> tuple[list[list[Example]], int, Any]:
    """The rows as groups of sequences (SFT: one example; DPO: chosen, rejected), validated
    (bad rows raise, or are skipped into rejects.jsonl), how many were truncated, and the rows
    themselves (``Example.index`` indexes them)."""
    d = cfg.data
    dpo = cfg.algo.objective == "dpo"
    if d.source in SOURCES:
        rows: Any = (demo_pair_rows if dpo else demo_sft_rows)(d.demo_size, cfg.run.seed, d.source)
    else:
        rows = load_rows(d.source, d.demo_size, cfg.run.seed)
    prepare = prepare_preferences if dpo else prepare_sft
    prepared = prepare(
        rows,
        tokenizer,
        source=d.source,
        template=d.template,
        plain_template=d.plain_template,
        max_length=d.max_length,
        on_bad_row=d.on_bad_row,
    )
    keep_rejects(out, d.source, prepared.rejects)
    if dpo:
        groups = [[p.chosen, p.rejected] for p in prepared.pairs]  # type: ignore[union-attr]
    else:
        groups = [[e] for e in prepared.examples]  # type: ignore[union-attr]
    return groups, prepared.num_truncated, rows


def answer_prompts(
    cfg: Config, tokenizer: Any, rows: Any, held_out: list[list[Example]]
) -> list[Prompt]:
    """SFT's held-out rows that carry an answer (``data.answer_field``), as prompts for the
    rollout workers: rendered as their training context was, so the policy is asked what it
    was taught. Chat rows (``messages``) have no one prompt to ask and are left out. An answer
    the verifiers cannot take fails the run before any model loads (the message counts rows
    among these held-out ones)."""
    d = cfg.data
    sft = cfg.algo.objective == "sft"
    if not (sft and cfg.run.eval_every and cfg.reward.functions):
        return []
    index = [
        i
        for i in (g[0].index for g in held_out)
        if rows[i].get(d.answer_field) is not None and rows[i].get("messages") is None
    ]
    if not index:
        return []
    prepared = prepare_prompts(
        [rows[i] for i in index],
        tokenizer,
        source=f"{d.source} (held-out rows with an answer)",
        prompt_field="prompt",  # SFT's prompt/completion rows name it so (data.prepare_sft)
        answer_field=d.answer_field,
        template=d.template,
        plain_template=d.plain_template,
        max_prompt_tokens=d.max_length,  # a prompt longer than this failed prepare_sft already
        task_field=d.task_field,
    )
    return [dataclasses.replace(p, index=i) for p, i in zip(prepared.prompts, index)]


def make_batch(groups: list[list[Example]], pad_id: int) -> ScoredBatch:
    """Groups of sequences as one batch, group i = ``groups[i]``, rows in order."""
    seqs = [e for g in groups for e in g]
    return ScoredBatch.from_sequences(
        [e.ids for e in seqs],
        [e.spans for e in seqs],
        [i for i, g in enumerate(groups) for _ in g],
        [e.index for e in seqs],
        pad_id,
    )


def reference_logprobs(
    cluster: Cluster, groups: list[list[Example]], chunk: int, pad_id: int, path: Path
) -> list[list[torch.Tensor]]:
    """Per sequence, the reference policy's logprobs of its episode tokens: read from ``path``
    if a previous process of this run wrote it, else one forward per pair (before any update,
    the policy is the reference) and written there."""
    if path.exists():
        flat = load_file(str(path))
        return [[flat[f"{i}.{j}"] for j in range(len(g))] for i, g in enumerate(groups)]
    out: list[list[torch.Tensor]] = []
    for start in range(0, len(groups), chunk):
        part = groups[start : start + chunk]
        batch = make_batch(part, pad_id)
        logp_NT = cluster.logprobs(batch)
        lengths = (batch.episode_mask != 0).sum(-1).tolist()
        rows = iter(logp_NT[i, :n].clone() for i, n in enumerate(lengths))
        out.extend([next(rows) for _ in g] for g in part)
    flat = {f"{i}.{j}": t for i, g in enumerate(out) for j, t in enumerate(g)}
    tmp = path.with_suffix(".partial")
    save_file(flat, str(tmp))
    tmp.rename(path)  # complete or absent: a run killed mid-pass recomputes it
    return out


def with_reference(batch: ScoredBatch, ref: list[torch.Tensor]) -> ScoredBatch:
    """``batch`` with ``ref_logprobs`` [N, T] filled from per-row episode logprobs."""
    ref_NT = torch.zeros(batch.episode_ids.shape, dtype=torch.float32)
    for i, r in enumerate(ref):
        ref_NT[i, : len(r)] = r
    batch.ref_logprobs = ref_NT
    return batch


def evaluate(
    cluster: Cluster,
    cfg: Config,
    groups: list[list[Example]],
    refs: Any,
    pad_id: int,
    step: int,
    prompts: list[Prompt],
) -> dict[str, float]:
    """Held-out metrics with the current weights: SFT token-mean NLL; DPO loss and accuracy.

    SFT with ``prompts`` (:func:`answer_prompts`) also reports ``eval_accuracy``: the policy
    answers each prompt ``rollout.group_size`` times, sampled at ``rollout.temperature`` (the
    sampler has no greedy mode), and it is the mean over all those samples of the weighted
    reward total: with one 0/1 verifier (exact_match), the share of answers it accepts, an
    estimate of the probability that the policy answers a held-out prompt right.
    """
    if cfg.algo.objective == "sft":
        total, count = 0.0, 0.0
        for start in range(0, len(groups), cfg.samples_per_step):
            batch = make_batch(groups[start : start + cfg.samples_per_step], pad_id)
            total -= float(cluster.logprobs(batch).sum())
            count += float(batch.loss_mask.sum())
        out = {"eval_loss": total / max(count, 1.0)}
        if prompts:
            # ---- generate with this step's weights: sync them first, as GRPO does
            out["eval_version"] = cluster.sync_weights().version
            scored = cluster.collect(cluster.submit_rollout(step, prompts))
            if scored.valid.any():  # reward errors (reward.on_error=mask) are left out
                out["eval_accuracy"] = float(scored.reward_total[scored.valid].mean())
        return out
    chosen, rejected, ref_c, ref_r, len_c, len_r = [], [], [], [], [], []
    for start in range(0, len(groups), cfg.algo.prompts_per_step):
        part = groups[start : start + cfg.algo.prompts_per_step]
        batch = make_batch(part, pad_id)
        mask = batch.loss_mask
        seq_N, n_N = sequence_logps(cluster.logprobs(batch), mask)
        ref = with_reference(batch, [r for rs in refs[start : start + len(part)] for r in rs])
        assert ref.ref_logprobs is not None  # with_reference filled it
        ref_N, _ = sequence_logps(ref.ref_logprobs, mask)
        chosen.append(seq_N[0::2])
        rejected.append(seq_N[1::2])
        ref_c.append(ref_N[0::2])
        ref_r.append(ref_N[1::2])
        len_c.append(n_N[0::2])
        len_r.append(n_N[1::2])
    cat: Callable[[list[torch.Tensor]], torch.Tensor] = torch.cat
    loss, stats = dpo_loss(
        cat(chosen), cat(rejected), cat(ref_c), cat(ref_r), cfg.dpo, cat(len_c), cat(len_r)
    )
    return {"eval_loss": float(loss), "eval_accuracy": float(stats["rewards/accuracies"])}


def train_offline(cfg: Config) -> dict[str, Any]:
    """Run SFT or DPO (``algo.objective``) for ``cfg.run.steps`` steps. Returns a summary."""
    objective = cfg.algo.objective
    if objective == "grpo":
        raise ValueError("algo.objective=grpo runs through dist_ft.recipes.grpo.train")
    dpo = objective == "dpo"
    out = prepare_output_dir(cfg)
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    torch.use_deterministic_algorithms(cfg.run.deterministic)

    # ---- data: every row validated and tokenized before any model loads
    model_path = resolve_model_path(cfg.model.path, cfg.model.tiny)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    groups, truncated, rows = load_sequences(cfg, tokenizer, out)
    n_eval = cfg.data.eval_rows
    if n_eval >= len(groups):
        raise ConfigError(
            f"data.eval_rows={n_eval} leaves nothing to train on: {cfg.data.source} has "
            f"{len(groups)} usable rows",
            keys=("data.eval_rows",),
        )
    train_rows, eval_rows = groups[: len(groups) - n_eval], groups[len(groups) - n_eval :]
    eval_prompts = answer_prompts(cfg, tokenizer, rows, eval_rows)
    sampler = PromptSampler(len(train_rows), cfg.run.seed)
    pad_id = tokenizer.pad_token_id
    ckpt, state, run_tensors = open_checkpoint(cfg, out)

    # ---- learners, and rollout workers only to answer the held-out prompts
    rollout_spec, learner_spec = component_specs(cfg, model_path)
    cluster = cluster_for(cfg, rollout_spec, learner_spec, None if eval_prompts else 0)
    write_placement(out, cluster)
    if dpo:
        shown: tuple[str, ...] = ("loss", "eval_loss", "accuracy", "eval_accuracy")
    else:
        shown = ("loss", "eval_loss", *(("eval_accuracy",) if eval_prompts else ()))
        shown += ("tokens_per_s",)
    tracker = make_tracker(
        cfg,
        out,
        state,
        shown=shown,
        plotted=("loss", *shown[1:]),
        plot_name=f"{objective}.png",
    )
    final_dir = out / ("adapter" if cfg.peft.method.value != "none" else "model")
    done = state.get("step", 0)
    summary: dict[str, Any] = {"output_dir": str(out), "reference_forwards": 0}
    status = RunStatus(out, done, cfg.run.steps)
    status.handle_signals()

    def checkpoint_now() -> None:
        write_checkpoint(cfg, cluster, done, tracker, {"sampler": sampler.state_dict()}, {})

    try:
        if ckpt is not None:
            cluster.load_state(ckpt)
            sampler.load_state_dict(state["sampler"])
            restore_driver_rng(state, run_tensors)
        refs: list[list[torch.Tensor]] = []
        if dpo:
            # ---- reference: once per pair, with the weights of step 0 (or read back)
            ref_path = out / REFERENCE_FILE
            if ckpt is None:  # a fresh run never reads a reference it did not compute
                ref_path.unlink(missing_ok=True)
            elif not ref_path.exists():
                raise FileNotFoundError(
                    f"{ref_path} is missing: the reference logprobs of this run cannot be "
                    "recomputed from trained weights; start the run afresh"
                )
            computed = not ref_path.exists()
            refs = reference_logprobs(cluster, groups, cfg.algo.prompts_per_step, pad_id, ref_path)
            summary["reference_forwards"] = len(groups) if computed else 0

        for step in range(done + 1, cfg.run.steps + 1):
            # ---- one step, its evaluation and checkpoint: a SIGTERM/Ctrl-C waits for its end
            with status.step():
                t0 = time.perf_counter()
                chosen = sampler.next(cfg.algo.prompts_per_step)
                batch = make_batch([train_rows[i] for i in chosen], pad_id)
                if dpo:
                    with_reference(batch, [r for i in chosen for r in refs[i]])
                metrics = cluster.train_step(batch, objective)
                seconds = time.perf_counter() - t0
                metrics.update(
                    step_seconds=seconds,
                    tokens_per_s=metrics["tokens"] / seconds,
                    truncated=truncated,
                )
                if dpo:
                    metrics["accuracy"] = metrics.pop("rewards/accuracies")
                done = step
                if (
                    eval_rows
                    and cfg.run.eval_every
                    and (step % cfg.run.eval_every == 0 or step == cfg.run.steps)
                ):
                    eval_refs = refs[len(train_rows) :] if dpo else None
                    metrics.update(
                        evaluate(cluster, cfg, eval_rows, eval_refs, pad_id, step, eval_prompts)
                    )
                tracker.log(step, metrics)
                if checkpoint_due(cfg, step):
                    checkpoint_now()
                status.update(step)
        cluster.save_pretrained(final_dir)
        summary[final_dir.name] = str(final_dir)
        status.update(done, FINISHED)
    except BaseException as e:
        stop_run(e, cfg, status, cluster, final_dir, done, checkpoint_now)
        raise
    finally:
        status.restore_signals()
        summary["plot"] = finish_tracking(tracker)
        cluster.shutdown()
    summary["first_loss"] = tracker.mean("loss", first=5)
    summary["last_loss"] = tracker.mean("loss", last=5)
    return summary
