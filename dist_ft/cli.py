"""``dist-ft``: train, demo. Exit code 2 with a one-line message for bad configs or data."""

from __future__ import annotations

import argparse
import sys

import yaml

from dist_ft.checkpoint import CheckpointError
from dist_ft.config import Config, ConfigError, config_to_dict, load_config
from dist_ft.data import DatasetError
from dist_ft.rewards import RewardError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-ft", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run GRPO from a YAML recipe")
    train.add_argument("config", help="path to a YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="section.key=value, applied after the YAML")
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    plan = sub.add_parser("plan", help="print placement, batch sizes and bytes; no training")
    plan.add_argument("config", help="path to a YAML config")
    plan.add_argument("overrides", nargs="*", help="section.key=value")
    demo = sub.add_parser("demo", help="train the built-in tiny model on the built-in task")
    demo.add_argument("overrides", nargs="*", help="section.key=value")
    return p


def describe_plan(cfg: Config) -> str:
    """Placement (against the running cluster in Ray mode), derived batch sizes, and the bytes
    a step moves, computed without loading weights or training."""
    from transformers import AutoConfig

    from dist_ft.batch import ScoredBatch
    from dist_ft.cluster import init_ray, predict_placement
    from dist_ft.models import resolve_model_path, sync_bytes

    res = cfg.resources
    lines = [f"mode: {res.mode}"]
    if res.mode == "ray":
        import ray

        init_ray(res.ray_address, res.rollout_workers + res.learners)
        try:
            nodes = [n for n in ray.nodes() if n["Alive"]]
        finally:
            ray.shutdown()
        lines += [f"  node {n['NodeManagerAddress']}: {n['Resources']}" for n in nodes]
        gpu = res.device == "cuda"
        placed = predict_placement(nodes, res.rollout_workers, res.learners, gpu)
        lines += [f"  {actor:18} -> {node}" for actor, node in placed]
    else:
        lines.append(f"  {res.rollout_workers} rollout worker(s) and 1 learner in this process")
    b, g = cfg.algo.prompts_per_step, cfg.rollout.group_size
    lines += [
        f"batch: {b} prompts x {g} completions = {cfg.samples_per_step} samples per step; "
        f"{cfg.samples_per_step // res.learners} per learner rank, micro-batch "
        f"{cfg.micro_batch_size} x {cfg.learner.micro_batches} accumulation step(s)",
    ]
    per_sample = ScoredBatch.bytes_per_sample(
        cfg.data.max_prompt_tokens,
        cfg.rollout.max_new_tokens,
        len(cfg.reward.functions),
        ref=cfg.algo.beta > 0,
    )
    path = resolve_model_path(cfg.model.path, cfg.model.tiny)
    sizes = sync_bytes(AutoConfig.from_pretrained(path), cfg.peft, cfg.model.dtype)
    adapter = cfg.peft.method.value != "none"
    sync = sizes["adapter"] if adapter else sizes["full"]
    lines += [
        f"rollout -> learner: <= {per_sample:,} bytes per sample (prompts padded to "
        f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}), <= "
        f"{per_sample * cfg.samples_per_step:,} bytes per step",
        f"learner -> rollout: {sync:,} bytes per sync "
        f"({'adapter only' if adapter else 'full weights'}; full model {sizes['full']:,})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(getattr(args, "config", None), args.overrides)
        if getattr(args, "print_config", False):
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            return 0
        if args.command == "plan":
            print(describe_plan(cfg))
            return 0
        from dist_ft.trainer import train  # heavy imports only when training

        summary = train(cfg)
    except (ConfigError, DatasetError, FileNotFoundError) as e:
        print(f"dist-ft: error: {e}", file=sys.stderr)
        return 2
    except (RewardError, CheckpointError, TimeoutError) as e:  # stopped mid-run, loudly
        print(f"dist-ft: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(
        f"mean reward: first {summary['window']} steps {summary['first_reward']:.3f}, "
        f"last {summary['window']} steps {summary['last_reward']:.3f} "
        f"(rise {summary['last_reward'] - summary['first_reward']:+.3f})"
    )
    print(f"metrics: {summary['metrics']}  plot: {summary['plot']}  weights: {summary['final']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
