"""Typed, nested, strict run configuration.

Precedence is defaults < YAML < ``a.b=c`` overrides. The defaults alone are a complete run: the
built-in demo (tiny model, letter-repeat task, GRPO with LoRA), so ``dist-ft demo`` needs no file.

Only ``cli.py``, ``recipes/`` and ``run/`` see the whole tree; components take typed specs that
``run.specs.component_specs`` builds from it (``peft:`` is ``models.PeftSpec`` itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import math
import re
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from dist_ft.algos.dpo import DPOParams
from dist_ft.algos.grpo import LossType
from dist_ft.algos.objective import Objective
from dist_ft.models import PeftSpec
from dist_ft.peft_methods import config_errors as peft_config_errors
from dist_ft.ranges import NonNegFloat, NonNegInt, PosFloat, PosInt, Range
from dist_ft.tasks import SOURCES as DEMO_SOURCES


class ConfigError(ValueError):
    """A config file or override that does not fit the schema. The message names the key;
    ``keys`` holds the dotted keys at fault, so the loader can name where each was set."""

    def __init__(self, message: str, keys: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.keys = tuple(keys)


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the built-in tiny Llama (used when ``model.path == "tiny"``)."""

    hidden_size: PosInt = 64
    num_layers: PosInt = 2
    num_heads: PosInt = 4
    seed: NonNegInt = 0


@dataclass(frozen=True)
class ModelConfig:
    # A local HF model directory, or "tiny" for the built-in model. Hub ids are not fetched.
    path: str = "tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass(frozen=True)
class DataConfig:
    # "demo" (built-in letter-repeat task; "demo_next", "demo_mix": see dist_ft.tasks), or a
    # .jsonl / .parquet file / save_to_disk folder.
    source: str = "demo"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    task_field: str = "task"  # which reward functions score a row; rows without it: "default"
    template: Literal["plain", "chat"] = "plain"
    plain_template: str = "{prompt}"
    max_prompt_tokens: PosInt = 256
    demo_size: PosInt = 256
    # A malformed row fails the run before step 1 ("error", naming file, row and field), or is
    # left out, counted and written to <output_dir>/rejects.jsonl ("skip").
    on_bad_row: Literal["error", "skip"] = "error"
    # SFT and DPO: tokens per sequence (prompt + answer); longer ones are cut from the right
    # and counted (metric "truncated").
    max_length: PosInt = 1024
    # SFT and DPO: the last this many good rows are held out and evaluated every
    # run.eval_every steps (SFT: loss, and for rows with an answer the reward.functions' mean
    # over sampled answers; DPO: loss and preference accuracy), never trained on.
    eval_rows: NonNegInt = 0


@dataclass(frozen=True)
class RolloutConfig:
    # G completions per prompt
    group_size: Annotated[int, Range(ge=2, why="advantages are group-relative")] = 8
    max_new_tokens: PosInt = 8
    temperature: PosFloat = 1.0
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    # Rollout workers hold the policy in this dtype; syncs are cast to it before they are sent
    # (fp32 learner + bf16 rollout halves the sync). "auto": model.dtype.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # The generation engine: "hf" (transformers generate; logprobs from its own pass), or a
    # "package.module:Class" implementing dist_ft.rollout.Generator, built as Class(GeneratorSpec).
    generator: str = "hf"
    # fp32 LoRA: the "hf" engine decodes through W0 + scaling * B @ A (rollout/merged.py): 1.2x
    # faster generation for a second copy of the adapted weights. false: peft adds B @ A x.
    merge_lora: bool = True
    # Workers hash the bytes of every weight sync they receive; every Nth sync on Ray (the
    # first included) they also re-export and hash what their model holds after loading, which
    # costs a full export. Debug mode reads back every sync.
    read_back_every: PosInt = 10


@dataclass(frozen=True)
class RewardFnConfig:
    # A built-in verifier name (see dist_ft.rewards.BUILTIN) or "package.module:function".
    name: str
    weight: Annotated[float, Range()] = 1.0  # any finite number; < 0 penalises
    kwargs: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)  # the tasks it scores; [] = every task


def _demo_rewards() -> list[RewardFnConfig]:
    # char_match gives partial credit, which a random-init model needs to find any signal;
    # exact_match at weight 0 is logged only, to show the share of fully right answers.
    return [RewardFnConfig("char_match", 1.0), RewardFnConfig("exact_match", 0.0)]


def _judge_model() -> ModelConfig:
    return ModelConfig(tiny=TinyModelConfig(seed=1))  # a tiny judge unlike the tiny policy


@dataclass(frozen=True)
class JudgeConfig:
    """The RLAIF judge, used when a reward function is named ``judge``. It scores with a local
    HF causal LM guided by a constitution; on Ray it runs as its own actor(s), next to the
    rollout workers."""

    model: ModelConfig = field(default_factory=_judge_model)
    constitution: str = "configs/constitutions/default.yaml"  # .yaml or .md list of principles
    # pointwise: expected rating from the judge's next-token probabilities over ``ratings``;
    # group: the judge sees the G completions of a prompt together; score = P(best).
    mode: Literal["pointwise", "group"] = "pointwise"
    ratings: list[str] = field(default_factory=lambda: ["1", "2", "3", "4", "5"])
    template: str = ""  # "" = the built-in template of the mode
    batch_size: PosInt = 16
    actors: PosInt = 1  # Ray mode: judge actors, each placed on a rollout worker's node


@dataclass(frozen=True)
class RewardConfig:
    functions: list[RewardFnConfig] = field(default_factory=_demo_rewards)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    timeout_s: PosFloat = 30.0  # per call of each function, for the whole batch it scores
    # A sample whose reward raised, timed out or was NaN/inf: left out of the loss ("mask",
    # its group's advantages come from the valid samples), scored 0 ("zero"), or fatal.
    on_error: Literal["mask", "zero", "abort"] = "mask"
    # The run stops when more than this share of a step's samples have a reward error for
    # ``error_patience`` steps in a row: a broken reward should not train for hours.
    max_error_rate: Annotated[float, Range(ge=0, le=1)] = 0.1
    error_patience: PosInt = 3


@dataclass(frozen=True)
class AlgoConfig:
    # grpo (RL from rewards: `dist-ft train`), sft (demonstrations: `dist-ft sft`), dpo
    # (preference pairs: `dist-ft dpo`). The commands set it; the other sections mean the same.
    objective: Objective = Objective.GRPO
    loss: LossType = LossType.GRPO
    # B; a GRPO step trains on B x G samples, an SFT step on B examples, a DPO step on B pairs
    prompts_per_step: PosInt = 8
    scale_rewards: bool = True  # divide advantages by the group std; Dr.GRPO turns this off
    eps_low: Annotated[float, Range(ge=0, lt=1)] = 0.2
    eps_high: NonNegFloat = 0.2  # DAPO's clip-higher uses 0.28
    beta: NonNegFloat = 0.0  # KL(k3) coefficient against the reference policy; 0 skips ref logprobs
    # SFT steps on answer-*shaped* targets before RL (built-in demo sources only): a random-init
    # model first learns to answer with four identical letters, then RL learns which letter.
    sft_warmup_steps: NonNegInt = 40
    # Async rollouts: workers generate up to this many policy versions ahead of the learner.
    # 0 is exactly on-policy (generate, train, sync, in turn); 1 overlaps generation of step
    # s+1 with training on step s. No sample older than this is ever trained on.
    max_staleness: NonNegInt = 0


@dataclass(frozen=True)
class LearnerConfig:
    # 1e-3 is the demo's LoRA rate (LoRA wants ~10x the full fine-tuning rate). At 3e-3 the demo
    # collapsed whole prompts onto one wrong letter within 100 steps on 3 of 4 seeds: a group of
    # G identical wrong answers has zero advantage and never recovers.
    # "auto": the rate of peft.method, 10x the full fine-tuning rate for LoRA (1e-3, as here)
    # and the papers' ratios for the others (peft_methods.auto_lr).
    lr: Annotated[float | Literal["auto"], Range(gt=0)] = 1e-3
    weight_decay: NonNegFloat = 0.0
    grad_clip: NonNegFloat = 1.0  # max global grad norm; 0 = no clipping (DeepSpeed's convention)
    zero_stage: Annotated[int, Range(ge=0, le=3)] = 0
    offload: Literal["none", "cpu"] = "none"
    # Gradient accumulation: the per-rank batch is split into this many micro-batches.
    micro_batches: PosInt = 1
    # SFT and DPO pack each micro-batch's rows into fewer (block-causal mask): the same loss to
    # float error, 2.0x faster a step on the tiny model at 19-130 tokens a row. GRPO and prefix
    # tuning run padded (Learner._logprobs says why).
    pack: bool = True


@dataclass(frozen=True)
class ResourcesConfig:
    mode: Literal["local", "ray"] = "local"
    ray_address: str = "auto"  # for mode=ray: "auto" (inside a cluster) or HOST:PORT
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "auto": one per unit of the custom resource ``rollout`` when the cluster advertises it,
    # else one per GPU the learners leave free, else one per node (1 in local mode).
    rollout_workers: Annotated[int | Literal["auto"], Range(ge=1)] = 1
    learners: PosInt = 1
    # Per actor; "auto" is 1 GPU per actor on CUDA and 0 on CPU.
    rollout_cpus: NonNegFloat = 1.0
    rollout_gpus: Annotated[float | Literal["auto"], Range(ge=0)] = "auto"
    learner_cpus: NonNegFloat = 1.0
    learner_gpus: Annotated[float | Literal["auto"], Range(ge=0)] = "auto"
    # Put rollout worker i and learner rank i in one placement-group bundle (same node, and on
    # GPUs the same device, half each): for clusters where generation and training share GPUs.
    colocate: bool = False
    # fp32 linear layers on CPU: "onednn" runs large products on oneDNN (1.1-1.5x MKL's sgemm,
    # same fp32 arithmetic: dist_ft/onednn.py), "torch" on torch's default. Not GPUs, not bf16.
    cpu_linear: Literal["onednn", "torch"] = "onednn"
    # A rollout worker or learner rank that does not answer within this many seconds fails the
    # run with its name, instead of hanging it.
    actor_timeout_s: PosFloat = 600.0
    # Ray restarts a rollout worker that dies this many times; its lost groups are issued again.
    max_restarts: NonNegInt = 3


@dataclass(frozen=True)
class RunConfig:
    name: str = "demo"
    steps: PosInt = 600
    seed: NonNegInt = 0
    output_dir: str = "runs/demo"
    # wandb runs offline unless asked: nothing leaves the machine by default.
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "dist_ft"
    plot: bool = True
    # Run checkpoints (every rank's DeepSpeed state + the run state) every N steps; 0 = off.
    checkpoint_every: NonNegInt = 0
    # SFT and DPO: evaluate the data.eval_rows held-out rows every N steps and at the end; 0 off.
    eval_every: NonNegInt = 0
    keep_checkpoints: NonNegInt = 2  # 0 keeps every one
    # GRPO: this many of a step's sampled completions (its first group's first) with prompt,
    # answer and rewards, to samples.jsonl and wandb, every tenth of the run; 0 = none.
    log_samples: NonNegInt = 8
    # "none", "auto" (the newest committed checkpoint under output_dir, if any) or a path.
    resume: str = "none"
    # Resuming refuses a config whose training semantics differ from the checkpoint's.
    resume_allow_changes: bool = False
    # A fresh run refuses an output_dir that holds another run's metrics or checkpoints (they
    # would mix, and resume=auto would pick the old run's); true removes the old outputs first.
    overwrite: bool = False
    # Deterministic kernels and seeds: the same seed gives the same loss trajectory on CPU.
    deterministic: bool = False


@dataclass(frozen=True)
class LabelConfig:
    """``dist-ft label``: RLAIF preference pairs, the policy's samples judged by the judge."""

    # .jsonl or .parquet; "" = <run.output_dir>/labels.jsonl. Counts go to <stem>.meta.json.
    output: str = ""
    # A pair is kept when the judge's position-debiased margin for chosen over rejected (in
    # [-1, 1]: P(chosen named best | shown first) - P(rejected named best | shown first)) is at
    # least this; the others are dropped and counted. The random-init tiny judge's are ~0.01.
    min_margin: Annotated[float, Range(ge=-1, le=1)] = 0.1
    prompts: NonNegInt = 0  # the first this many good rows of data.source; 0 = all of them

    def __post_init__(self) -> None:
        if self.output and Path(self.output).suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"label.output={self.output}: use a .jsonl or .parquet path")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftSpec = field(default_factory=PeftSpec)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    dpo: DPOParams = field(default_factory=DPOParams)  # algo.objective=dpo only
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    run: RunConfig = field(default_factory=RunConfig)
    label: LabelConfig = field(default_factory=LabelConfig)  # `dist-ft label` only

    def __post_init__(self) -> None:
        # Cross-field rules only: the loader has checked every key's own range before this runs,
        # so nothing here divides by zero.
        grpo = self.algo.objective is Objective.GRPO
        # DPO splits whole pairs; GRPO any sample (its advantages are computed before)
        units = (
            self.samples_per_step
            if self.algo.objective is not Objective.DPO
            else (self.algo.prompts_per_step)
        )
        if units % (self.resources.learners * self.learner.micro_batches):
            what = {
                Objective.GRPO: "algo.prompts_per_step x rollout.group_size = {} samples",
                Objective.SFT: "algo.prompts_per_step = {} examples",
                Objective.DPO: "algo.prompts_per_step = {} pairs",
            }[self.algo.objective].format(units)
            raise ConfigError(
                f"{what} must split evenly over resources.learners x learner.micro_batches = "
                f"{self.resources.learners} x {self.learner.micro_batches}",
                keys=(
                    "algo.prompts_per_step",
                    *(("rollout.group_size",) if grpo else ()),
                    "resources.learners",
                    "learner.micro_batches",
                ),
            )
        if grpo and self.algo.sft_warmup_steps and self.data.source not in DEMO_SOURCES:
            raise ConfigError(
                f"algo.sft_warmup_steps={self.algo.sft_warmup_steps} is the built-in demo's "
                f"format warm-up; set algo.sft_warmup_steps=0 for data.source={self.data.source}",
                keys=("algo.sft_warmup_steps", "data.source"),
            )
        res = self.resources
        if res.colocate and res.rollout_workers not in ("auto", res.learners):
            raise ConfigError(
                "resources.colocate pairs rollout worker i with learner rank i: set "
                "resources.rollout_workers equal to resources.learners "
                f"({res.rollout_workers} != {res.learners})",
                keys=("resources.colocate", "resources.rollout_workers", "resources.learners"),
            )
        # DeepSpeed's fp16 mode (dynamic loss scaling) has no CPU implementation: on CPU it
        # fails inside deepspeed.initialize with "Type fp16 is not supported on your device".
        # "auto" is refused too: whether it means CUDA depends on the machine that loads the
        # config. Every other model.dtype x rollout.dtype pair trains and syncs bit-exactly on
        # CPU (tests/integration/test_dtypes.py); rollout.dtype=float16 on CPU runs, but CPUs
        # without AVX512-FP16/AMX-FP16 have no fp16 matmul kernel (measured ~40x slower than
        # fp32), so bfloat16 is the CPU choice for a halved sync.
        if self.model.dtype == "float16" and res.device != "cuda":
            raise ConfigError(
                f"model.dtype=float16 with resources.device={res.device}: DeepSpeed trains in "
                "float16 on CUDA only; set resources.device=cuda on a GPU machine, or use "
                "model.dtype=bfloat16 (or float32) with rollout.dtype=float16 if the rollout "
                "should run in float16",
                keys=("model.dtype", "resources.device"),
            )
        if grpo and not self.reward.functions:  # else the run fails after the model loads
            raise ConfigError(
                "reward.functions is empty: name at least one reward function",
                keys=("reward.functions",),
            )
        for message, keys in peft_config_errors(self.peft):  # a peft key the method ignores
            raise ConfigError(message, keys=keys)
        if self.peft.adapters and not grpo:
            raise ConfigError(
                f"peft.adapters trains one adapter per task group under GRPO (dist-ft train); "
                f"algo.objective={self.algo.objective.value} trains one adapter: remove "
                "peft.adapters",
                keys=("peft.adapters", "algo.objective"),
            )

    @property
    def samples_per_step(self) -> int:
        """Rows a learner step trains on: B x G samples, B examples, or B pairs' 2B answers."""
        per_prompt = {Objective.GRPO: self.rollout.group_size, Objective.SFT: 1, Objective.DPO: 2}
        return self.algo.prompts_per_step * per_prompt[self.algo.objective]

    @property
    def micro_batch_size(self) -> int:
        """Samples per learner micro-batch, derived: B x G / learners / micro_batches."""
        return self.samples_per_step // (self.resources.learners * self.learner.micro_batches)


# ---------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        out = _coerce(value, base, key)
        number = isinstance(out, int | float) and not isinstance(out, bool)
        for rng in extras:
            if isinstance(rng, Range) and number and out not in rng:
                rule = rng if math.isfinite(out) else "finite"  # YAML's .nan and .inf
                raise ConfigError(f"{key}={value}: must be {rule}", keys=(key,))
        return out
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(
                f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}", keys=(key,)
            )
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}", keys=(key,))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(
                f"{key}: expected a list, got {type(value).__name__} {value!r}", keys=(key,)
            )
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}", keys=(key,))
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # a default: rebuilt so that its values are checked too
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping, got {type(value).__name__} {value!r}", keys=(key,)
            )
        return _build(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(
                f"{key}: expected one of {[m.value for m in tp]}, got {value!r}", keys=(key,)
            ) from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(
                f"{key}: expected bool, got {type(value).__name__} {value!r}", keys=(key,)
            )
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"{key}: expected int, got {type(value).__name__} {value!r}", keys=(key,)
            )
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(
                f"{key}: expected float, got {type(value).__name__} {value!r}", keys=(key,)
            )
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(
                f"{key}: expected str, got {type(value).__name__} {value!r}", keys=(key,)
            )
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a schema bug, not user error


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            valid = [f"{prefix}.{n}" if prefix else n for n in names]
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {names}"
            raise ConfigError(f"unknown config key '{full}'{hint}", keys=(full,))
    kwargs = {}
    for f in fields:
        # Defaults go through the same checks as set values: a retuned default out of its
        # range fails every load, blamed on "defaults".
        if f.name in data:
            value = data[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue  # required: cls() below names it
        kwargs[f.name] = _coerce(value, hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
    try:
        return cls(**kwargs)
    except ConfigError:  # a cross-key rule of Config: it names its keys
        raise
    except (TypeError, ValueError) as e:  # a required field missing, or a rule of the section
        raise ConfigError(f"{prefix or 'config'}: {e}", keys=(prefix,)) from None


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted keys of the values in ``tree``; a list or a scalar is one value."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _blame(keys: Sequence[str], sources: dict[str, str]) -> str:
    """Where the values of ``keys`` were set: the file and/or the overrides that set any of them,
    else "defaults". A key matches the value set at it, above it or below it."""
    named = []
    for key in keys or sources:
        key = re.sub(r"\[\d+\]", "", key)  # list items come with their list
        named += [
            src
            for k, src in sources.items()
            if k == key or k.startswith(f"{key}.") or key.startswith(f"{k}.")
        ]
    return " and ".join(dict.fromkeys(named)) or "defaults"


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {path} is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not loaded:  # an empty file would otherwise train the defaults without a word
        raise ConfigError(
            f"{path} is empty (it sets no keys); to train the built-in defaults run `dist-ft demo`"
        )
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML-safe dict (enums as their values)."""

    def plain(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from defaults, an optional YAML file and ``a.b=c`` overrides.

    Every key's type and range is checked, then the cross-field rules; an error names the key
    and the source that set it (the file, the override, or the defaults).
    """
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}  # dotted key -> where its value came from
    if path is not None:
        tree = _read_yaml(path)
        sources = dict.fromkeys(_leaves(tree), str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:  # an unclosed flow list or mapping (`a.b=[8`) is no value
            _set_path(tree, key, yaml.safe_load(raw) if raw else "")
        except yaml.YAMLError as e:
            why = f"{raw!r} is not a YAML value ({getattr(e, 'problem', None) or e})"
            raise ConfigError(
                f"command-line override '{item}': {why}; close it or quote it"
            ) from None
        # the override replaces the whole value at `key`, whatever the file set below it
        sources = {k: s for k, s in sources.items() if not k.startswith(f"{key}.")}
        sources[key] = f"command-line override '{item}'"
    try:
        return _build(Config, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{_blame(e.keys, sources)}: {e}", e.keys) from None
