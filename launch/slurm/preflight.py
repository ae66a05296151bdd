"""Fail a SLURM job in seconds, with the numbers, when its config asks Ray for more CPUs or GPUs
than the job was granted, or when its run.output_dir already holds another run.

Usage: python launch/slurm/preflight.py [--nodes N --cpus-per-node C [--gpus-per-node G]]
           CONFIG [a.b=c ...]

Without --nodes only the config and run.output_dir are checked (launch/ray_submit.sh does that
before it uploads anything). The output dir check is the trainer's own (check_run_dir), so a
job is refused for exactly what `dist-ft train` would refuse, before Ray starts instead of after.

Without it, actors that do not fit wait unplaced for resources.actor_timeout_s (600 s by
default) before the run fails. It sums exactly what RayCluster asks for (the requests of
dist_ft.cluster.placement.plan_actors, which RayCluster places its actors with) and checks the
totals, and the largest single request (a colocated bundle is one), against one node; where Ray
then places the actors is `dist-ft plan`'s business.
"""

from __future__ import annotations

import argparse
import sys

from dist_ft.cluster.placement import plan_actors
from dist_ft.config import ConfigError, load_config
from dist_ft.run.outputs import check_run_dir
from dist_ft.run.specs import actor_spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="preflight.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int)
    p.add_argument("--cpus-per-node", type=float)
    p.add_argument("--gpus-per-node", type=float, default=0.0)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if (args.nodes is None) != (args.cpus_per_node is None):
        p.error("--nodes and --cpus-per-node go together")
    try:
        cfg = load_config(args.config, args.overrides)
        check_run_dir(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"dist_ft: error: {e}", file=sys.stderr)
        return 2
    if args.nodes is None:
        print(f"dist_ft: run.output_dir={cfg.run.output_dir}: ok")
        return 0

    res = cfg.resources
    # The Ray nodes this job starts: one per SLURM node, none advertising `rollout`.
    per_node = {"CPU": args.cpus_per_node, "GPU": args.gpus_per_node}
    # "auto" is CUDA where the driver (on the first node) sees a GPU.
    gpu = res.device == "cuda" or (res.device == "auto" and args.gpus_per_node > 0)
    plan = plan_actors(actor_spec(cfg, gpu), [{"Resources": per_node}] * args.nodes)
    need, biggest = plan.total(), plan.largest()
    roles = {role: plan.of(role) for role in ("rollout", "judge", "learner")}
    asks = ", ".join(
        f"{len(actors)} {role}(s) at {actors[0].describe_asks()}"
        for role, actors in roles.items()
        if actors
    )
    if plan.bundles:
        asks += f"; colocated in {len(plan.bundles)} bundle(s) of {dict(plan.bundles[0])}"
    grant = f"{args.nodes} node(s) x {args.cpus_per_node:g} CPUs"
    if args.gpus_per_node:
        grant += f" x {args.gpus_per_node:g} GPUs"
    short = [
        f"{need.get(k, 0.0):g} {k}s (the largest single request {biggest.get(k, 0.0):g})"
        for k, have in per_node.items()
        if need.get(k, 0.0) > args.nodes * have or biggest.get(k, 0.0) > have
    ]
    if short:
        print(
            f"dist_ft: error: the config's Ray actors need {' and '.join(short)} ({asks}), but "
            f"this job has {grant}. Resubmit with more --cpus-per-task, --gpus-per-node or "
            "--nodes (`sbatch --test-only ...` tells whether the cluster has them), or lower "
            "resources.rollout_workers, resources.learners or resources.*_cpus / *_gpus.",
            file=sys.stderr,
        )
        return 3
    have = args.nodes * args.cpus_per_node
    print(f"dist_ft: Ray actors need {need['CPU']:g} of {have:g} CPUs ({asks})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
