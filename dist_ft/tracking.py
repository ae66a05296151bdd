"""Metrics to metrics.jsonl and wandb (offline unless configured), a progress bar, PNG plots."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dist_ft.ledger import truncate_jsonl


class Tracker:
    def __init__(
        self,
        output_dir: Path,
        *,
        run_name: str,
        total_steps: int,
        wandb_mode: str,
        wandb_project: str,
        config: dict[str, Any],
        plot: bool = True,
        resume_step: int | None = None,
        run_id: str | None = None,
        shown: tuple[str, ...] = ("reward/mean", "kl", "samples_per_s"),
        plotted: tuple[str, ...] = ("reward/mean", "kl"),
        plot_name: str = "reward.png",
        breakdown: str = "",
    ) -> None:
        """``resume_step``: continue a run whose checkpoint holds this step; metrics logged
        after it (by the process that died) are dropped, earlier ones are kept and reloaded.
        ``run_id``: the tracking run to continue (wandb id). ``shown``: the metrics on the
        progress line; ``plotted``: one panel each in ``plot_name`` (a metric never logged, or
        always 0 after the first, gets none). ``breakdown``: a prefix; each metric under it is
        one more line in the first panel (``reward/task/``: the reward of each task)."""
        self.shown, self.plotted, self.plot_name = shown, plotted, plot_name
        self.breakdown = breakdown
        self.output_dir = output_dir
        self.metrics_path = output_dir / "metrics.jsonl"
        self.history: list[dict[str, float]] = []
        if resume_step is not None:
            truncate_jsonl(self.metrics_path, resume_step)
            lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
            self.history = [json.loads(line) for line in lines]
        self._file = self.metrics_path.open("a" if resume_step is not None else "w")
        self.plot = plot
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb

            # The config holds no secrets by construction (keys come from the environment).
            self._wandb = wandb.init(
                project=wandb_project,
                name=run_name,
                mode=wandb_mode,
                dir=str(output_dir),
                config=config,
                reinit="finish_previous",
                id=run_id,
                resume="allow" if run_id else None,
            )
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
        self._progress.start()
        self._t0 = time.perf_counter()

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

    def mean(self, key: str, first: int | None = None, last: int | None = None) -> float:
        values = [r[key] for r in self.history if key in r]
        values = values[:first] if first is not None else values
        values = values[-last:] if last is not None else values
        return sum(values) / len(values) if values else math.nan

    def finish(self) -> Path | None:
        """Stop the progress bar, close metrics.jsonl, finish wandb, write the plot (or None
        when there is nothing to plot)."""
        self._progress.stop()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        return self._plot() if self.plot else None

    def _plot(self) -> Path | None:
        # The first metric is plotted whenever it was logged, even if always 0 (a reward that
        # never rose is the point of the plot); the others only when they were ever nonzero (KL
        # is exactly 0 when its term is off). A step that did not log a metric has no point.
        first, *rest = self.plotted
        panels = [first] if any(first in r for r in self.history) else []
        panels += [k for k in rest if any(r.get(k) for r in self.history)]
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
            ax.plot(steps, values, alpha=0.35, label="per step")
            k = max(1, len(values) // 30)  # moving average over ~1/30 of the run
            ax.plot(steps, _smooth(values, k), label=f"mean of {k}")
            for part in parts if key == first else []:  # smoothed: per step they'd hide the rest
                part_steps, part_values = self._series(part)
                ax.plot(part_steps, _smooth(part_values, k), label=part[len(self.breakdown) :])
            ax.legend(loc="best")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        path = self.output_dir / self.plot_name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def _series(self, key: str) -> tuple[list[int], list[float]]:
        """The steps that logged ``key``, and its values there."""
        rows = [r for r in self.history if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]


def _smooth(values: list[float], k: int) -> list[float]:
    """Trailing moving average over ``k`` values (fewer at the start)."""
    windows = [values[max(0, i - k + 1) : i + 1] for i in range(len(values))]
    return [sum(w) / len(w) for w in windows]
