"""Metrics to metrics.jsonl and wandb (offline unless configured), progress (a bar on a
terminal, plain lines in a file), sampled completions to samples.jsonl, PNG plots."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dist_ft.config import Config, config_to_dict
from dist_ft.run.ledger import truncate_jsonl
from dist_ft.wire.batch import ScoredBatch, Span

if TYPE_CHECKING:
    from dist_ft.wire.prompt import Prompt

LINE_EVERY_S = 30.0  # off a terminal, a progress line at least this often, whatever the steps
# What an all-zero panel of the plot says, by metric (else "0 at every step")
ZERO_NOTES = {"kl": "0 at every step: no KL term (grpo.beta=0)"}
SHOWN_CHARS = 160  # of a prompt or completion, in the one sample a log line shows


class Tracker:
    def __init__(
        self,
        output_dir: Path,
        *,
        run_name: str,
        total_steps: int,
        wandb_mode: Literal["offline", "online", "disabled"],
        wandb_project: str,
        config: dict[str, Any],
        plot: bool = True,
        resume_step: int | None = None,
        run_id: str | None = None,
        shown: tuple[str, ...] = ("reward/mean", "loss", "kl", "samples_per_s"),
        plotted: tuple[str, ...] = ("reward/mean", "kl"),
        plot_name: str = "reward.png",
        breakdown: str = "",
        log_samples: int = 0,
    ) -> None:
        """``resume_step``: continue a run whose checkpoint holds this step; metrics logged
        after it (by the process that died) are dropped, earlier ones are kept and reloaded.
        ``run_id``: the tracking run to continue (wandb id). ``shown``: the metrics on the
        progress line; ``plotted``: one panel each in ``plot_name`` (see :meth:`figure`).
        ``breakdown``: a prefix; each metric under it is one more line in the first panel
        (``reward/task/``: the reward of each task). ``log_samples``: sampled completions kept
        per :meth:`log_samples` call.

        Every ``every`` steps (a tenth of the run) and at the first two steps of this process,
        off a terminal a progress line is printed (also when 30 s passed since the last one),
        and :meth:`log_samples` keeps samples."""
        self.shown, self.plotted, self.plot_name = shown, plotted, plot_name
        self.run_name, self.total_steps, self.log_samples_n = run_name, total_steps, log_samples
        self.every = max(1, math.ceil(total_steps / 10))
        self.breakdown = breakdown
        self.output_dir = output_dir
        self.metrics_path = output_dir / "metrics.jsonl"
        self.samples_path = output_dir / "samples.jsonl"
        self.history: list[dict[str, float]] = []
        if resume_step is not None:
            truncate_jsonl(self.metrics_path, resume_step)
            truncate_jsonl(self.samples_path, resume_step)
            lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
            self.history = [json.loads(line) for line in lines]
        self._file = self.metrics_path.open("a" if resume_step is not None else "w")
        self.plot = plot
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb

            # The config holds no secrets by construction (keys come from the environment).
            # The console is not captured: whatever a user's reward prints (a secret too) would
            # be kept in the run's output.log, and uploaded online; WANDB_CONSOLE=wrap asks for
            # it. silent: wandb's banner and 30-line summary stay out of the run's output.
            # WANDB_CONSOLE is any string a user sets; wandb's Settings validates it (the ignore)
            console = os.environ.get("WANDB_CONSOLE", "off")
            settings = wandb.Settings(console=console, silent=True)  # type: ignore[arg-type]
            self._wandb = wandb.init(
                project=wandb_project,
                name=run_name,
                mode=wandb_mode,
                dir=str(output_dir),
                config=config,
                reinit="finish_previous",
                id=run_id,
                resume="allow" if run_id else None,
                settings=settings,
            )
            run = self._wandb
            where = (
                run.url
                if wandb_mode == "online"
                else f"{run.settings.sync_dir} (`wandb sync` uploads it)"
            )
            print(f"wandb: {wandb_mode} run {where}", flush=True)
        self.run_id = self._wandb.id if self._wandb is not None else None
        self._progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        done = resume_step or 0
        self._task = self._progress.add_task("train", total=total_steps, completed=done, info="")
        # Off a terminal (CI, nohup, sbatch and Ray job logs) a live bar shows only at the end
        self.plain = not self._progress.console.is_terminal
        if self.plain:
            print(
                f"{run_name}: steps {done + 1}-{total_steps} of {total_steps}; a progress line "
                f"every {self.every} steps or {LINE_EVERY_S:.0f} s, with the time left from "
                "step 2",
                flush=True,
            )
        else:
            self._progress.start()
        self._t0 = self._printed = time.perf_counter()
        # (step, time) of the first step this process logged: the origin of the time per step
        # (the time before it went to loading models and the warm-up, not to steps)
        self._first: tuple[int, float] | None = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time": round(time.perf_counter() - self._t0, 3), **metrics}
        self.history.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        # a metric absent this step (no valid reward, no eval) shows as n/a, never as a number
        info = "  ".join(
            f"{k} {'n/a' if metrics.get(k) is None else f'{metrics[k]:.4g}'}" for k in self.shown
        )
        self._progress.update(self._task, completed=step, info=info)
        now = time.perf_counter()
        self._first = self._first or (step, now)
        first, since = self._first
        if self.plain and (
            self._due(step) or step == first + 1 or now - self._printed >= LINE_EVERY_S
        ):
            self._printed = now
            if step > first:
                per_step = (now - since) / (step - first)
                left = _clock(per_step * (self.total_steps - step))
                timing = f"{per_step:.3g} s/step, {left} left"
            else:
                timing = f"{_clock(now - self._t0)} to the first step"
            print(
                f"step {step}/{self.total_steps} ({step / self.total_steps:.0%})  {info}  "
                f"[{timing}]",
                flush=True,
            )

    def _due(self, step: int) -> bool:
        """Steps that always get a progress line and samples: every ``every``th, the last, and
        the first of this process."""
        assert self._first is not None  # log() sets it, and log_samples() follows a log()
        return step % self.every == 0 or step == self.total_steps or step == self._first[0]

    def log_samples(
        self, step: int, batch: ScoredBatch, tokenizer: Any, prompts: list[Prompt]
    ) -> None:
        """On a due step, ``log_samples`` of the step's samples, decoded (:func:`sample_rows`),
        to samples.jsonl and a wandb table; one of them printed."""
        if not (self.log_samples_n and self._due(step)):
            return
        rows = sample_rows(batch, tokenizer, prompts, self.log_samples_n)
        with self.samples_path.open("a") as f:
            f.writelines(json.dumps({"step": step, **r}) + "\n" for r in rows)
        if self._wandb is not None:
            import wandb

            names = batch.reward_names
            table = wandb.Table(
                columns=["step", "prompt", "completion", "answer", "reward", "advantage", *names]
            )
            for r in rows:
                text = "".join(t["text"] for t in r["turns"])
                scores = [r["rewards"][n] for n in names]
                table.add_data(
                    step, r["prompt"], text, r["answer"], r["reward"], r["advantage"], *scores
                )
            self._wandb.log({"samples": table}, step=step)
        r = rows[0]
        scores_text = ", ".join(
            f"{n} {'error' if v is None else f'{v:.3g}'}" for n, v in r["rewards"].items()
        )
        text = "".join(t["text"] for t in r["turns"])
        print(
            f"sample, step {step}: {_clip(r['prompt'])} -> {_clip(text)} (answer "
            f"{_clip(r['answer'])}; reward {r['reward']:.3g}: {scores_text})",
            flush=True,
        )

    def mean(self, key: str, first: int | None = None, last: int | None = None) -> float:
        values = [r[key] for r in self.history if key in r]
        values = values[:first] if first is not None else values
        values = values[-last:] if last is not None else values
        return sum(values) / len(values) if values else math.nan

    def finish(self) -> Path | None:
        """Stop the progress bar, close metrics.jsonl, finish wandb, write the plot (or None
        when there is nothing to plot)."""
        if not self.plain:
            self._progress.stop()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        return self._plot() if self.plot else None

    def figure(self) -> Any:
        """The plot of ``plotted`` against step (a matplotlib Figure, one panel per metric
        logged at least once), or None when none was. The first panel also draws the
        ``breakdown`` metrics; a metric that is 0 at every step is drawn and says so (KL with
        the KL term off); accuracies get the whole [0, 1] axis, so a small change looks small.
        """
        panels = [k for k in self.plotted if any(k in r for r in self.history)]
        if not panels:
            return None
        import matplotlib

        matplotlib.use("Agg")  # no display on cluster nodes
        import matplotlib.pyplot as plt

        named = {k for r in self.history for k in r}
        parts = sorted(k for k in named if k.startswith(self.breakdown)) if self.breakdown else []
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3 * len(panels)), squeeze=False)
        for ax, key in zip(axes[:, 0], panels):
            steps, values = self._series(key)
            k = max(1, len(values) // 30)  # moving average over ~1/30 of the run
            ax.plot(steps, values, alpha=0.35 if k > 1 else 1.0, label="per step")
            if k > 1:  # a mean of 1 would draw the same line again
                ax.plot(steps, _smooth(values, k), label=f"mean of {k}")
            for part in parts if key == panels[0] else []:  # smoothed: per step they'd hide all
                part_steps, part_values = self._series(part)
                ax.plot(part_steps, _smooth(part_values, k), label=part[len(self.breakdown) :])
            if not any(values):
                note = ZERO_NOTES.get(key, "0 at every step")
                ax.text(0.5, 0.75, note, transform=ax.transAxes, ha="center", va="center")
            if "accuracy" in key:
                ax.set_ylim(min(0.0, *values), max(1.0, *values))
            if len(ax.get_lines()) > 1:
                ax.legend(loc="best")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{self.run_name}: {', '.join(panels)} by step")
        fig.tight_layout()
        return fig

    def _plot(self) -> Path | None:
        fig = self.figure()
        if fig is None:
            return None
        import matplotlib.pyplot as plt

        path = self.output_dir / self.plot_name
        try:
            fig.savefig(path, dpi=100)
        finally:
            plt.close(fig)
        return path

    def _series(self, key: str) -> tuple[list[int], list[float]]:
        """The steps that logged ``key``, and its values there."""
        rows = [r for r in self.history if key in r]
        return [int(r["step"]) for r in rows], [r[key] for r in rows]


def sample_rows(
    batch: ScoredBatch, tokenizer: Any, prompts: list[Prompt], n: int
) -> list[dict[str, Any]]:
    """The first ``n`` samples of ``batch`` in group order (the first group's completions
    first: their advantages compare), as samples.jsonl rows. The episode is a list of turns
    (the policy's and, multi-turn, the environment's), decoded from the token ids as sampled;
    a reward that failed on a sample is None."""
    by_index = {p.index: p for p in prompts}
    rows = []
    for i in torch.argsort(batch.group_ids, stable=True)[:n].tolist():
        prompt = by_index[int(batch.sample_ids[i, 1])]
        turns = [
            {
                "role": "policy" if span is Span.TRAINED else "context",
                "text": tokenizer.decode(ids, skip_special_tokens=True),
            }
            for span, ids in batch.turns(i)
        ]
        rewards = {
            name: None if batch.reward_errors[i, k] else float(batch.rewards[i, k])
            for k, name in enumerate(batch.reward_names)
        }
        rows.append(
            {
                "sample_id": batch.sample_ids[i].tolist(),  # (step, prompt row, completion)
                "version": int(batch.versions[i]),
                "task": prompt.task,
                "prompt": prompt.text,
                "turns": turns,
                "answer": prompt.answer,
                "reward": float(batch.reward_total[i]),
                "rewards": rewards,
                "advantage": float(batch.advantages[i]),
                "trained": bool(batch.valid[i]),
            }
        )
    return rows


def _clip(text: str | None) -> str:
    """``text`` quoted with escapes (a newline stays on its line), cut to SHOWN_CHARS."""
    shown = repr(text)
    return shown if len(shown) <= SHOWN_CHARS else shown[: SHOWN_CHARS - 3] + "..."


def _clock(seconds: float) -> str:
    """1:02:03, 2:03 or 0:07."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _smooth(values: list[float], k: int) -> list[float]:
    """Trailing moving average over ``k`` values (fewer at the start)."""
    windows = [values[max(0, i - k + 1) : i + 1] for i in range(len(values))]
    return [sum(w) / len(w) for w in windows]


def make_tracker(cfg: Config, out: Path, state: dict[str, Any], **display: Any) -> Tracker:
    """metrics.jsonl, wandb and the progress bar of a run (continued from ``state`` when it
    resumes); ``display``: what the progress line shows and the plot draws (see Tracker)."""
    return Tracker(
        out,
        run_name=cfg.run.name,
        total_steps=cfg.run.steps,
        wandb_mode=cfg.run.wandb,
        wandb_project=cfg.run.wandb_project,
        config=config_to_dict(cfg),
        plot=cfg.run.plot,
        resume_step=state.get("step"),
        run_id=state.get("run_id"),
        log_samples=cfg.run.log_samples,
        **display,
    )


def finish_tracking(tracker: Tracker) -> Path | None:
    """Close metrics, wandb and the plot; returns the plot. A failure here is only a warning: it
    runs in ``finally``, where an exception would skip the cluster's shutdown and replace the
    error that stopped the run. metrics.jsonl is complete either way (each row is flushed)."""
    try:
        return tracker.finish()
    except Exception as e:
        warnings.warn(f"finishing the run failed: {type(e).__name__}: {e}", stacklevel=2)
        return None
