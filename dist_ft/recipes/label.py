"""RLAIF preference labelling: ``label(cfg)``, read top to bottom (``dist-ft label``).

The rollout workers sample G completions per prompt and score them with ``reward.functions``,
the judge among them, on the cluster GRPO uses (``run.specs.cluster_for``: in this process, or
on Ray with the judge as its own actor). Of each prompt's completions, the best- and the
worst-scored distinct ones are the candidate pair. The judge then compares the two in both orders
and averages (``JudgeWorker.compare``: position-debiased, a margin in [-1, 1]), and the pair is
kept, chosen = the better-scored one, when that margin is at least ``label.min_margin``. The score
picks, the debiased comparison confirms: a pair the two judgements disagree on has a negative
margin and is dropped, as is one the judge barely prefers; both are counted.

Rows (jsonl or parquet, by ``label.output``'s suffix), which ``dist-ft dpo`` reads as they are:
``prompt`` (the data row's own text, so DPO renders it with the same template), ``chosen``,
``rejected``, ``margin``, ``principle_scores`` (the margin under each principle alone),
``chosen_score``/``rejected_score`` (the reward that picked them), ``constitution_sha256`` and
``judge_model``. ``<stem>.meta.json`` beside it holds the counts, the judge and the config.
"""

from __future__ import annotations

import collections
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dist_ft.config import Config, ConfigError, config_to_dict
from dist_ft.data import load_rows, prompt_row, write_rejects
from dist_ft.model.loading import load_tokenizer, resolve_model_path
from dist_ft.rewards.judge import load_constitution
from dist_ft.run.samplers import load_prompts
from dist_ft.run.specs import cluster_for, component_specs, judge_spec
from dist_ft.wire.batch import ScoredBatch, Span


def label(cfg: Config) -> dict[str, Any]:
    """Label ``label.prompts`` rows of ``data.source``; returns the summary that is also
    written to ``<stem>.meta.json`` (counts, judge, paths)."""
    judge = judge_spec(cfg)
    if judge is None:
        raise ConfigError(
            "dist-ft label needs the RLAIF judge: add {name: judge} to reward.functions",
            keys=("reward.functions",),
        )
    output = Path(cfg.label.output or Path(cfg.run.output_dir) / "labels.jsonl")
    meta_path = output.with_suffix(".meta.json")
    if output.exists() and not cfg.run.overwrite:
        raise ConfigError(
            f"label.output={output} already exists: choose another path, or replace it with "
            "run.overwrite=true",
            keys=("label.output",),
        )
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    t_start = time.perf_counter()

    # ---- data: the prompts, validated and rendered before any model loads; the rows' own
    # text goes into the output, so that DPO renders it with the same template
    model_path = resolve_model_path(cfg.model.path, cfg.model.tiny)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    d = cfg.data
    prepared = load_prompts(cfg, tokenizer)
    prompts = prepared.prompts[: cfg.label.prompts or None]
    rows = load_rows(d.source, d.demo_size, cfg.run.seed)
    raw = {p.index: prompt_row(rows, p.index)[d.prompt_field] for p in prompts}
    if prepared.rejects:
        rejects = output.with_suffix(".rejects.jsonl")
        write_rejects(rejects, prepared.rejects)
        print(f"data: skipped {len(prepared.rejects)} malformed rows, written to {rejects}")

    # ---- provenance: what every label was judged against, on every row
    constitution = load_constitution(judge.constitution)
    provenance = {
        "constitution_sha256": constitution.sha256(),
        "judge_model": judge.model_path,
    }

    # ---- placement: GRPO's cluster; on Ray the judge is its own actor
    rollout_spec, learner_spec = component_specs(cfg, model_path)
    cluster = cluster_for(cfg, rollout_spec, learner_spec)
    pairs: list[dict[str, Any]] = []
    counts: collections.Counter[str] = collections.Counter()
    judge_scores: list[float] = []  # every valid sample's judge score: the policy's mean
    margins_seen: list[float] = []
    try:
        placement = cluster.placement()  # node and pid of every actor, the judges' included
        # ---- sync once: the workers sample the learner's initial weights (a PEFT init too)
        cluster.sync_weights()
        b = cfg.algo.prompts_per_step
        for step, start in enumerate(range(0, len(prompts), b), 1):
            chunk = prompts[start : start + b]
            by_index = {p.index: p for p in chunk}

            # ---- generate + score: G completions per prompt, the judge's scores among them
            batch = cluster.collect(cluster.submit_rollout(step, chunk))
            ok_N = ~batch.reward_errors.any(1)
            counts["reward_errors"] += int((~ok_N).sum())
            judge_scores += batch.rewards[ok_N, batch.reward_names.index("judge")].tolist()
            texts = completion_texts(batch, tokenizer)

            # ---- candidates: the best- and worst-scored distinct completions of a prompt
            picked = []  # (prompt, chosen row, rejected row)
            for g in batch.group_ids.unique().tolist():
                members = (batch.group_ids == g).nonzero()[:, 0].tolist()
                prompt = by_index[int(batch.sample_ids[members[0], 1])]  # its dataset row
                rows_G = [i for i in members if ok_N[i]]
                pick = candidates([texts[i] for i in rows_G], batch.reward_total[rows_G].tolist())
                if pick is None:
                    counts["no_pair"] += 1
                else:
                    picked.append((prompt, rows_G[pick[0]], rows_G[pick[1]]))

            # ---- compare: both orders, averaged; kept when the margin clears min_margin
            margins, per_principle = (
                cluster.compare(
                    [p.text for p, _, _ in picked],
                    [texts[c] for _, c, _ in picked],
                    [texts[r] for _, _, r in picked],
                )
                if picked
                else ([], [])
            )
            margins_seen += margins
            for (prompt, c, r), margin, per in zip(picked, margins, per_principle):
                if margin < cfg.label.min_margin:
                    counts["below_margin"] += 1
                    counts["disagreed"] += margin < 0
                    continue
                pairs.append(
                    {
                        "prompt": raw[prompt.index],
                        "chosen": texts[c],
                        "rejected": texts[r],
                        "margin": margin,
                        "principle_scores": dict(zip(constitution.principles, per)),
                        "chosen_score": float(batch.reward_total[c]),
                        "rejected_score": float(batch.reward_total[r]),
                        **provenance,
                    }
                )
            print(
                f"label: {start + len(chunk)}/{len(prompts)} prompts, {len(pairs)} pairs kept",
                file=sys.stderr,
                flush=True,
            )
    finally:
        cluster.shutdown()

    # ---- write: the pairs, then the run's counts and provenance beside them
    write_pairs(output, pairs)
    summary: dict[str, Any] = {
        "output": str(output),
        "meta": str(meta_path),
        "prompts": len(prompts),
        "samples": len(judge_scores) + counts["reward_errors"],
        "pairs": len(pairs),
        "dropped_below_margin": counts["below_margin"],
        "dropped_disagreed": counts["disagreed"],  # of those below: the judgements disagreed
        "dropped_no_pair": counts["no_pair"],  # fewer than two distinct scored completions
        "reward_errors": counts["reward_errors"],
        "min_margin": cfg.label.min_margin,
        "judge_mean": float(torch.tensor(judge_scores).mean()) if judge_scores else None,
        "judge_std": float(torch.tensor(judge_scores).std()) if len(judge_scores) > 1 else None,
        "margin_mean": sum(margins_seen) / len(margins_seen) if margins_seen else None,
        "kept_margin_mean": sum(p["margin"] for p in pairs) / len(pairs) if pairs else None,
        "seconds": time.perf_counter() - t_start,
        **provenance,
        "judge_mode": cfg.reward.judge.mode,
        "constitution": {
            "path": judge.constitution,
            "name": constitution.name,
            "principles": constitution.principles,
        },
        "policy_model": model_path,
        "placement": placement,
    }
    meta_path.write_text(json.dumps({**summary, "config": config_to_dict(cfg)}, indent=1) + "\n")
    return summary


def completion_texts(batch: ScoredBatch, tokenizer: Any) -> list[str]:
    """[N] each sample's episode as text, special tokens (EOS) dropped: what DPO re-encodes."""
    return [
        tokenizer.decode(ids_T[mask_T != Span.PAD].tolist(), skip_special_tokens=True)
        for ids_T, mask_T in zip(batch.episode_ids, batch.episode_mask)
    ]


def candidates(texts: list[str], scores: list[float]) -> tuple[int, int] | None:
    """(best, worst): the highest-scored completion and the lowest-scored one whose text
    differs from it, blank ones left out (there is nothing in them to prefer); None when
    fewer than two distinct texts remain. Ties go to the earlier completion."""
    usable = [i for i, t in enumerate(texts) if t.strip()]
    if len({texts[i] for i in usable}) < 2:
        return None
    best = max(usable, key=lambda i: scores[i])
    worst = min((i for i in usable if texts[i] != texts[best]), key=lambda i: scores[i])
    return best, worst


def write_pairs(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as jsonl or parquet (by suffix), written under a temporary name and renamed:
    a run stopped mid-write leaves no half dataset behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    tmp.replace(path)
