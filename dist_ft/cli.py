"""``dist-ft``: train, demo. Exit code 2 with a one-line message for bad configs or data."""

from __future__ import annotations

import argparse
import sys

import yaml

from dist_ft.checkpoint import CheckpointError
from dist_ft.config import ConfigError, config_to_dict, load_config
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(getattr(args, "config", None), args.overrides)
        if getattr(args, "print_config", False):
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            return 0
        if args.command == "plan":
            from dist_ft.plan import describe_plan

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
