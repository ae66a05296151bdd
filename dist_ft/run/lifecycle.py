"""How a training run continues and how it stops, shared by both loops (GRPO's
``recipes.grpo.train`` and SFT/DPO's ``recipes.sft_dpo.train_offline``) so that the two cannot
drift: which checkpoint a run resumes from (or why it refuses), when and how a checkpoint is
written, and what a run stopped before its end keeps (weights, a checkpoint, ``status.json``)."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dist_ft.cluster import Cluster
from dist_ft.config import Config, ConfigError, config_to_dict
from dist_ft.rewards import RewardError
from dist_ft.run import checkpoint, runstatus
from dist_ft.run.outputs import held_outputs
from dist_ft.run.runstatus import RunStatus
from dist_ft.run.tracking import Tracker


def open_checkpoint(
    cfg: Config, out: Path
) -> tuple[Path | None, dict[str, Any], dict[str, torch.Tensor]]:
    """The checkpoint ``run.resume`` names (None, {}, {} for a fresh run) and its run state;
    refuses one of another recipe or another learner count before any compute is spent, and
    ``run.resume=auto`` with no checkpoint to continue a run whose history is there (starting
    fresh would truncate its metrics.jsonl and ledger.jsonl)."""
    try:
        ckpt = checkpoint.find_resume(out, cfg.run.resume)
    except checkpoint.CheckpointError as e:
        raise ConfigError(str(e), keys=("run.resume",)) from None
    if ckpt is None:
        if cfg.run.resume == "auto":
            root = checkpoint.root(out)
            if history := held_outputs(out, ("metrics.jsonl", "ledger.jsonl")):
                raise ConfigError(
                    f"run.resume=auto: {out} holds a run ({', '.join(history)}) but {root} has "
                    "no checkpoint to continue it from; nothing was changed: start over with "
                    "run.resume=none run.overwrite=true, or choose another run.output_dir",
                    keys=("run.resume",),
                )
            print(f"run.resume=auto: no checkpoint in {root}; starting fresh", file=sys.stderr)
        return None, {}, {}
    state, tensors = checkpoint.load_run_state(ckpt)
    changed = checkpoint.semantic_changes(state["config"], config_to_dict(cfg))
    if changed and not cfg.run.resume_allow_changes:
        raise ConfigError(
            f"{ckpt} was trained with other values of {changed}; resuming would change "
            "training semantics (set run.resume_allow_changes=true to accept)"
        )
    ranks = state["config"]["resources"]["learners"]
    if ranks != cfg.resources.learners:  # ZeRO optimizer state is partitioned per rank
        raise ConfigError(
            f"{ckpt} holds the state of {ranks} learner ranks; resume with "
            f"resources.learners={ranks}"
        )
    if why := runstatus.unfinished(out):
        print(f"the previous run in {out} {why}", file=sys.stderr)
    print(f"resuming from {ckpt} (step {state['step']})", file=sys.stderr)
    return ckpt, state, tensors


def checkpoint_due(cfg: Config, step: int) -> bool:
    """Every ``run.checkpoint_every`` steps, and at the last step (so that a finished run can
    be continued with more ``run.steps``)."""
    every = cfg.run.checkpoint_every
    return bool(every) and (step % every == 0 or step == cfg.run.steps)


def stop_run(
    e: BaseException,
    cfg: Config,
    status: RunStatus,
    cluster: Cluster,
    final_dir: Path,
    done: int,
    save_checkpoint_now: Callable[[], None],
) -> None:
    """What a run stopped before its end keeps, in both loops. A signal (Ctrl-C, SIGTERM) or a
    failure of the machinery (an actor that timed out or died, a full disk) keeps the weights
    trained so far (without run.checkpoint_every they are all there is); a signal with
    checkpoints on also writes one of step ``done``, for ``run.resume=auto``. A failing reward
    keeps nothing: those weights are no result. status.json says how the run ended."""
    interrupted = isinstance(e, KeyboardInterrupt)
    if interrupted:
        reason = e.args[0] if isinstance(e, runstatus.Interrupted) else "SIGINT"
    else:
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
    try:  # a second signal may cut this short: status.json says how the run ended anyway
        if not isinstance(e, RewardError):
            how = "interrupted" if interrupted else "stopped"
            save_interrupted(cluster, final_dir, done, how)
        ckpt = checkpoint.root(cfg.run.output_dir) / f"step-{done:08d}"
        if interrupted and cfg.run.checkpoint_every and done > 0 and not ckpt.is_dir():
            try:
                save_checkpoint_now()
            except Exception as err:
                print(f"{reason} at step {done}: checkpoint not written ({err})", file=sys.stderr)
            else:
                print(
                    f"{reason} at step {done}: checkpoint saved to {ckpt} "
                    "(continue with run.resume=auto)",
                    file=sys.stderr,
                )
    finally:
        status.update(done, runstatus.INTERRUPTED if interrupted else runstatus.FAILED, reason)


def save_interrupted(cluster: Cluster, final_dir: Path, done: int, how: str) -> None:
    """Keep the weights trained so far, under a name no finished run uses; ``how``:
    "interrupted" (a signal) or "stopped" (an error, named on the next line by the CLI)."""
    path = final_dir.with_name(f"{final_dir.name}-interrupted-step-{done}")
    try:
        cluster.save_pretrained(path)
    except Exception as e:
        print(f"{how} at step {done}: nothing saved ({type(e).__name__}: {e})", file=sys.stderr)
    else:
        print(f"{how} at step {done}: {final_dir.name} saved to {path}", file=sys.stderr)


def write_checkpoint(
    cfg: Config,
    cluster: Cluster,
    step: int,
    tracker: Tracker,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
) -> None:
    """One checkpoint of either loop: the learners' state, then the loop's ``state`` and
    ``tensors`` with what every run has (step, config, tracking run id, the driver's RNG).
    A failed write (a full disk) leaves the earlier checkpoints as they were."""
    ckpt_root = checkpoint.root(cfg.run.output_dir)
    with checkpoint.writing(ckpt_root, step, cfg.run.keep_checkpoints) as tmp:
        cluster.save_state(tmp)
        common = {
            "step": step,
            "python_rng": random.getstate(),
            "config": config_to_dict(cfg),
            "run_id": tracker.run_id,
        }
        rng = {"torch_rng": torch.get_rng_state()}
        checkpoint.save_run_state(tmp, {**common, **state}, {**rng, **tensors})


def restore_driver_rng(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The driver's Python and torch RNG as :func:`write_checkpoint` saved them."""
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(tensors["torch_rng"])
