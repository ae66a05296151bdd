"""Fail a SLURM job in seconds, with the numbers, when its config asks Ray for more CPUs than
the job was granted.

Usage: python launch/slurm/preflight.py --nodes N --cpus-per-node C [--gpus-per-node G]
           CONFIG [a.b=c ...]

Without it, actors that do not fit wait unplaced for resources.actor_timeout_s (600 s by
default) before the run fails. It counts what RayCluster asks for, per actor: each rollout
worker and each RLAIF judge actor resources.rollout_cpus, each learner rank
resources.learner_cpus. It checks totals and the largest single request against one node; where
Ray then places the actors is `dist-ft plan`'s business. GPUs are not checked here.
"""

from __future__ import annotations

import argparse
import sys

from dist_ft.config import ConfigError, load_config
from dist_ft.plan import resolve_rollout_workers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="preflight.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--cpus-per-node", type=float, required=True)
    p.add_argument("--gpus-per-node", type=float, default=0.0)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"dist_ft: error: {e}", file=sys.stderr)
        return 2

    res = cfg.resources
    # The Ray nodes this job starts: one per SLURM node, none advertising `rollout`.
    nodes = [{"Resources": {"CPU": args.cpus_per_node, "GPU": args.gpus_per_node}}] * args.nodes
    gpu = res.device == "cuda" or (res.device == "auto" and args.gpus_per_node > 0)
    workers = (
        res.learners
        if res.colocate
        else resolve_rollout_workers(res.rollout_workers, nodes, res.learners, gpu)
    )
    judges = cfg.reward.judge.actors if any(f.name == "judge" for f in cfg.reward.functions) else 0
    need = (workers + judges) * res.rollout_cpus + res.learners * res.learner_cpus
    have = args.nodes * args.cpus_per_node
    # A colocated pair is one placement-group bundle, so it must fit on one node whole.
    biggest = (
        res.rollout_cpus + res.learner_cpus
        if res.colocate
        else max(res.rollout_cpus, res.learner_cpus)
    )
    asks = (
        f"{workers} rollout worker(s) + {judges} judge actor(s) at {res.rollout_cpus:g} CPU, "
        f"{res.learners} learner(s) at {res.learner_cpus:g} CPU"
    )
    grant = f"{args.nodes} node(s) x {args.cpus_per_node:g} CPUs"
    if need > have or biggest > args.cpus_per_node:
        print(
            f"dist_ft: error: the config's Ray actors need {need:g} CPUs ({asks}; the largest "
            f"single request {biggest:g}), but this job has {grant}. Resubmit with more "
            "--cpus-per-task or --nodes (`sbatch --test-only ...` tells whether the cluster has "
            "them), or lower resources.rollout_workers, resources.learners or resources.*_cpus.",
            file=sys.stderr,
        )
        return 3
    print(f"dist_ft: Ray actors need {need:g} of {have:g} CPUs ({asks})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
