"""dist-ft commands: train, plan, demo.

Exit codes: 2 and a one-line message for a bad config, data or environment (found before any
model loads where it can be), 1 for a run stopped by a failing reward or checkpoint, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

import yaml

# Nothing heavy at import time: torch, datasets and transformers take 5-20 s to import, and
# `dist-ft --help` or a typo in a config should not wait for them.
if TYPE_CHECKING:
    from dist_ft.config import Config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dist-ft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    demo = sub.add_parser(
        "demo",
        help="train the built-in tiny model on the built-in task (starts fresh in runs/demo)",
    )
    demo.add_argument("overrides", nargs="*", help="section.key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    # A console script starts with its bin/ folder on sys.path, not the working directory that
    # `python -m` puts first; without it a user's reward module next to their config
    # (reward.functions: [{name: myrewards:score}]) cannot be imported.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    args = _parser().parse_args(argv)
    from dist_ft.config import ConfigError  # after argparse, which may exit with --help

    try:
        return _run(args)
    except (ConfigError, FileNotFoundError) as e:
        return _fail(e, 2)
    except KeyboardInterrupt:
        # The trainer's cleanup has run on the way here; its traceback would only repeat the
        # stack of whatever happened to be running.
        print("dist-ft: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from dist_ft.config import config_to_dict, load_config

    overrides = args.overrides
    if args.command == "demo":  # a demo run is a throwaway: running it again replaces it
        overrides = ["run.overwrite=true", *overrides]
    cfg = load_config(getattr(args, "config", None), overrides)
    if getattr(args, "print_config", False):
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.command == "plan":
        from dist_ft.plan import describe_plan

        print(describe_plan(cfg))
        return 0
    preflight(cfg)
    # Training's imports (datasets, deepspeed, ray) only once the inputs are known to be good.
    from dist_ft.checkpoint import CheckpointError
    from dist_ft.data import DatasetError
    from dist_ft.rewards import RewardError
    from dist_ft.trainer import train

    try:
        summary = train(cfg)
    except DatasetError as e:
        return _fail(e, 2)
    except (RewardError, CheckpointError, TimeoutError) as e:  # stopped mid-run, loudly
        return _fail(e, 1, named=True)
    print(
        f"mean reward: first {summary['window']} steps {summary['first_reward']:.3f}, "
        f"last {summary['window']} steps {summary['last_reward']:.3f} "
        f"(rise {summary['last_reward'] - summary['first_reward']:+.3f})"
    )
    print(f"metrics: {summary['metrics']}  plot: {summary['plot']}  weights: {summary['final']}")
    return 0


def preflight(cfg: Config) -> None:
    """Refuse, with the key to fix, what training would otherwise hit only after its imports and
    the model load (20-40 s in): a missing CUDA device, a reward function that cannot be
    imported, an incomplete model directory."""
    from dist_ft.config import ConfigError, check_device
    from dist_ft.models import check_model_path
    from dist_ft.rewards import RewardError, resolve

    check_device(cfg.resources.device)
    if cfg.resources.mode == "ray" and cfg.resources.ray_address != "local":
        from dist_ft.cluster.connect import check_address  # socket and gRPC only: ray loads later

        check_address(cfg.resources.ray_address)
    names = [f.name for f in cfg.reward.functions]
    # Local mode scores in this process. On Ray the workers import the functions, possibly from
    # a package installed only where they run.
    if cfg.resources.mode == "local":
        for i, name in enumerate(names):
            if name == "judge":  # the judge model, checked below
                continue
            try:
                resolve(name)
            except RewardError as e:
                raise ConfigError(f"reward.functions[{i}].name: {e}") from None
    check_model_path(cfg.model.path, "model.path")
    if "judge" in names:
        check_model_path(cfg.reward.judge.model.path, "reward.judge.model.path")


def _fail(e: BaseException, code: int, named: bool = False) -> int:
    print(f"dist-ft: error: {f'{type(e).__name__}: ' if named else ''}{e}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
