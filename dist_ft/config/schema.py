"""Typed, nested, strict run configuration.

Precedence is defaults < YAML < ``a.b=c`` overrides. The defaults alone are a complete run: the
built-in demo (tiny model, letter-repeat task, GRPO with LoRA), so ``dist-ft demo`` needs no file.

Only ``cli.py``, ``recipes/`` and ``run/`` see the whole tree; components take typed specs that
``run.specs.component_specs`` builds from it (``peft:`` is ``model.spec.PeftSpec`` itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from dist_ft.algos.advantages import ADVANTAGES
from dist_ft.algos.objective import OBJECTIVES
from dist_ft.algos.settings import DPOParams, LossType
from dist_ft.model.spec import PeftSpec
from dist_ft.model.spec import config_errors as peft_config_errors
from dist_ft.ranges import NonNegFloat, NonNegInt, PosFloat, PosInt, Range
from dist_ft.rollout.vllm_spec import VLLMOptions, check_vllm
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
    """Width of the tiny model's hidden states."""
    num_layers: PosInt = 2
    """Decoder layers of the tiny model."""
    num_heads: PosInt = 4
    """Attention heads of the tiny model (hidden_size must divide by it)."""
    seed: NonNegInt = 0
    """Seed of the tiny model's random weights (the same seed, the same model on every machine)."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = "tiny"
    """A local HF model directory, or "tiny" for the built-in model. Hub ids are not fetched."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The learner's parameter dtype (and the rollout workers' unless rollout.dtype says
    otherwise)."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model directory. Off: only architectures transformers ships
    load."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the built-in tiny model, used when path is "tiny"."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "demo"
    """"demo" (built-in letter-repeat task; "demo_next", "demo_mix": see dist_ft.tasks), an
    environment's problems ("calculator", "python", "code_editor", "calculator/format" for its SFT
    warm-up, "reasoning_gym/<task>"; see env.name), or a .jsonl / .parquet file / save_to_disk
    folder."""
    prompt_field: str = "prompt"
    """The column that holds a row's prompt (text, or chat messages with template=chat)."""
    answer_field: str = "answer"
    """The column with the reference answer the reward functions compare against (GRPO), or the
    target completion (SFT)."""
    task_field: str = "task"
    """which reward functions score a row; rows without it: "default"."""
    template: Literal["plain", "chat"] = "plain"
    """"plain": plain_template with {prompt} filled in; "chat": the tokenizer's chat template with a
    generation prompt."""
    plain_template: str = "{prompt}"
    """The prompt text a plain-template row becomes; {prompt} is the row's prompt_field."""
    max_prompt_tokens: PosInt = 256
    """A rendered prompt longer than this is a bad row (data.on_bad_row decides what happens to
    it)."""
    demo_size: PosInt = 256
    """Rows of the built-in demo task (source=demo and friends)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row fails the run before step 1 ("error", naming file, row and field), or is left
    out, counted and written to <output_dir>/rejects.jsonl ("skip")."""
    max_length: PosInt = 1024
    """SFT and DPO: tokens per sequence (prompt + answer); longer ones are cut from the right and
    counted (metric "truncated")."""
    eval_rows: NonNegInt = 0
    """SFT and DPO: the last this many good rows are held out and evaluated every run.eval_every
    steps (SFT: loss, and for rows with an answer the reward.functions' mean over sampled
    answers; DPO: loss and preference accuracy), never trained on."""


@dataclass(frozen=True)
class RolloutConfig:
    group_size: Annotated[int, Range(ge=2, why="advantages are group-relative")] = 8
    """G completions per prompt"""
    max_new_tokens: PosInt = 8
    """The completion budget in tokens; also Dr.GRPO's constant normaliser."""
    temperature: PosFloat = 1.0
    """Sampling temperature; the learner recomputes logprobs at it, so the importance ratio is 1
    on-policy."""
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    """Nucleus sampling: 1 samples from the whole distribution (what the logprobs describe)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Rollout workers hold the policy in this dtype; syncs are cast to it before they are sent
    (fp32 learner + bf16 rollout halves the sync). "auto": model.dtype."""
    generator: str = "hf"
    """The generation engine: "hf" (transformers generate; logprobs from its own pass), "vllm" (a
    vLLM engine per rollout worker, rollout.vllm: LoRA or full fine-tuning; README "Rollout
    engines"), or a "package.module:Class" implementing dist_ft.rollout.Generator, built as
    Class(GeneratorSpec)."""
    merge_lora: bool = True
    """fp32 LoRA: the "hf" engine decodes through W0 + scaling * B @ A (rollout/merged.py): 1.2x
    faster generation for a second copy of the adapted weights. false: peft adds B @ A x."""
    read_back_every: PosInt = 10
    """Workers hash the bytes of every weight sync they receive; every Nth sync on Ray (the first
    included) they also re-export and hash what their model holds after loading, which costs a
    full export. Debug mode reads back every sync."""
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    """The "vllm" engine's settings (generator=vllm only)."""


@dataclass(frozen=True)
class EnvConfig:
    """Multi-turn episodes: each of a prompt's G samples is an episode in an environment built
    from the prompt's dataset row, inside the rollout worker (dist_ft/envs, README
    "Environments")."""

    name: str | None = None
    """The environment: built in "calculator", "python" or "code_editor" (data.source of the same
    name gives its problems), "reasoning_gym" or "skyrl_gym" (other libraries' environments, the
    [envs] extra), or a "package.module:Class" with reset() and step() (dist_ft.envs.Environment).
    None: single-turn prompts."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment's constructor, after the row."""
    max_turns: PosInt = 4
    """Model turns an episode may take; one that reaches it unfinished is truncated
    (env/truncated)."""
    max_episode_tokens: PosInt = 256
    """Tokens after the prompt (the model's and the environment's); an episode whose next turn would
    not fit is truncated. Each model turn also stops at rollout.max_new_tokens."""
    timeout_s: PosFloat = 10.0
    """Seconds each call into the environment (construction, reset, step, a tool) may take; one that
    raises or takes longer ends its episode as a reward error (reward.on_error decides)."""
    reward_weight: Annotated[float, Range()] = 1.0
    """The weight of the environment's return (the sum of its turn rewards) in a sample's total,
    beside reward.functions (scored on the episode's transcript); logged as reward "env"."""


@dataclass(frozen=True)
class RewardFnConfig:
    name: str
    """A built-in verifier name (see dist_ft.rewards.BUILTIN) or "package.module:function"."""
    weight: Annotated[float, Range()] = 1.0
    """any finite number; < 0 penalises"""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to the function on every call."""
    tasks: list[str] = field(default_factory=list)
    """the tasks it scores; [] = every task"""


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
    """The judge model: a local HF directory, or "tiny" for the built-in model (tests and the
    demo)."""
    constitution: str = "configs/constitutions/default.yaml"
    """.yaml or .md list of principles"""
    mode: Literal["pointwise", "group"] = "pointwise"
    """pointwise: expected rating from the judge's next-token probabilities over ``ratings``; group:
    the judge sees the G completions of a prompt together; score = P(best)."""
    ratings: list[str] = field(default_factory=lambda: ["1", "2", "3", "4", "5"])
    """Pointwise mode: the choices the judge rates with, each one token; valued float(r), or 1..K
    when any is not a number."""
    template: str = ""
    """"" = the built-in template of the mode"""
    batch_size: PosInt = 16
    """Judge queries per forward pass."""
    actors: PosInt = 1
    """Ray mode: judge actors, each placed on a rollout worker's node"""


@dataclass(frozen=True)
class RewardConfig:
    functions: list[RewardFnConfig] = field(default_factory=_demo_rewards)
    """The reward functions, summed with their weights into each sample's reward."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The RLAIF judge, used when a reward function is named judge."""
    timeout_s: PosFloat = 30.0
    """per call of each function, for the whole batch it scores"""
    on_error: Literal["mask", "zero", "abort"] = "mask"
    """A sample whose reward raised, timed out or was NaN/inf: left out of the loss ("mask", its
    group's advantages come from the valid samples), scored 0 ("zero"), or fatal."""
    max_error_rate: Annotated[float, Range(ge=0, le=1)] = 0.1
    """The run stops when more than this share of a step's samples have a reward error for
    ``error_patience`` steps in a row: a broken reward should not train for hours."""
    error_patience: PosInt = 3
    """Steps in a row above max_error_rate before the run stops."""


@dataclass(frozen=True)
class AlgoConfig:
    """What every objective shares: which one runs, and how many prompts a step takes."""

    objective: str = "grpo"
    """grpo (RL from rewards: `dist-ft train`), sft (demonstrations: `dist-ft sft`), dpo (preference
    pairs: `dist-ft dpo`): a name in algos/objective.py's OBJECTIVES. The commands set it; each
    objective's own settings are in its section (grpo:, dpo:)."""
    prompts_per_step: PosInt = 8
    """B; a GRPO step trains on B x G samples, an SFT step on B examples, a DPO step on B pairs"""
    behaviour_logprobs: Literal["engine", "learner"] = "engine"
    """GRPO: whose logprobs of the sampled tokens the importance ratio divides by. "engine": the
    rollout engine's, which sampled them (with tis_cap, the ratio is the learner's and the engine
    enters through the truncated weight); "learner": the learner's own before its update,
    ignoring the engine's (a sampler/learner mismatch then goes uncorrected). The gap between
    the two is logged every step for every engine (mismatch/* metrics)."""
    tis_cap: Annotated[float | None, Range(ge=1)] = None
    """GRPO, behaviour_logprobs=engine: truncated importance sampling. Each token's loss is
    weighed by min(pi_learner / pi_engine, tis_cap), which corrects for an engine whose
    probabilities differ from the learner's (vLLM's kernels, bf16); 2 is the write-up's value.
    None: off."""
    max_mismatch: Annotated[float | None, Range(gt=0)] = None
    """GRPO: stop the run when a step's mean |log(pi_learner / pi_engine)| over the sampled
    tokens exceeds this (the rollout trust check: the engine is not sampling the policy being
    trained). None: off; the mismatch is logged regardless."""


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO and its variants (algo.objective=grpo, and `dist-ft label`'s sampling)."""

    loss: LossType = LossType.GRPO
    """The GRPO loss variant: grpo, dr_grpo (no length bias), dapo (token sum, clip-higher), gspo
    (sequence ratio)."""
    scale_rewards: bool = True
    """divide advantages by the group std; Dr.GRPO turns this off"""
    advantage: str = "grpo"
    """how a group's rewards become advantages: a name in algos/advantages.py's ADVANTAGES"""
    eps_low: Annotated[float, Range(ge=0, lt=1)] = 0.2
    """Clip range below 1 of the importance ratio (PPO's epsilon)."""
    eps_high: NonNegFloat = 0.2
    """DAPO's clip-higher uses 0.28"""
    beta: NonNegFloat = 0.0
    """KL(k3) coefficient against the reference policy; 0 skips ref logprobs"""
    sft_warmup_steps: NonNegInt = 40
    """SFT steps on answer-*shaped* targets before RL (built-in demo sources only): a random-init
    model first learns to answer with four identical letters, then RL learns which letter."""
    max_staleness: NonNegInt = 0
    """Async rollouts: workers generate up to this many policy versions ahead of the learner. 0 is
    exactly on-policy (generate, train, sync, in turn); 1 overlaps generation of step s+1 with
    training on step s. No sample older than this is ever trained on."""


@dataclass(frozen=True)
class LearnerConfig:
    lr: Annotated[float | Literal["auto"], Range(gt=0)] = 1e-3
    """1e-3 is the demo's LoRA rate (LoRA wants ~10x the full fine-tuning rate). At 3e-3 the demo
    collapsed whole prompts onto one wrong letter within 100 steps on 3 of 4 seeds: a group of G
    identical wrong answers has zero advantage and never recovers. "auto": the rate of
    peft.method, 10x the full fine-tuning rate for LoRA (1e-3, as here) and the papers' ratios
    for the others (model.spec.auto_lr)."""
    weight_decay: NonNegFloat = 0.0
    """AdamW's decoupled weight decay."""
    grad_clip: NonNegFloat = 1.0
    """max global grad norm; 0 = no clipping (DeepSpeed's convention)"""
    zero_stage: Annotated[int, Range(ge=0, le=3)] = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer state sharded), 2 (+ gradients),
    3 (+ parameters)."""
    offload: Literal["none", "cpu"] = "none"
    """"cpu": ZeRO keeps the optimizer state (and at stage 3 the parameters) in host memory."""
    micro_batches: PosInt = 1
    """Gradient accumulation: the per-rank batch is split into this many micro-batches."""
    pack: bool = True
    """SFT and DPO pack each micro-batch's rows into fewer (block-causal mask): the same loss to
    float error, 2.0x faster a step on the tiny model at 19-130 tokens a row. GRPO and prefix
    tuning run padded (Learner._logprobs says why)."""


@dataclass(frozen=True)
class ResourcesConfig:
    mode: Literal["local", "ray"] = "local"
    """"local": everything in this process (debug mode, CPU or one GPU); "ray": rollout workers and
    learners as Ray actors."""
    ray_address: str = "auto"
    """for mode=ray: "auto" (inside a cluster) or HOST:PORT"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where models run: "auto" is cuda when a GPU is visible, else cpu."""
    rollout_workers: Annotated[int | Literal["auto"], Range(ge=1)] = 1
    """"auto": one per unit of the custom resource ``rollout`` when the cluster advertises it, else
    one per GPU the learners leave free, else one per node (1 in local mode). With the ``rollout``
    resource "auto" is elastic: workers start on nodes that join and a lost node's prompts go to
    the others (dist_ft/cluster/fleet.py)."""
    min_rollout_workers: PosInt = 1
    """With rollout_workers "auto" on Ray: fewer live rollout workers than this (nodes left) and
    the run waits for nodes with the ``rollout`` resource to join, then stops after
    actor_timeout_s."""
    max_rollout_workers: NonNegInt = 0
    """With rollout_workers "auto": at most this many rollout workers; 0: one per ``rollout``
    unit the cluster has, as nodes join and leave."""
    learners: PosInt = 1
    """Learner ranks (one DeepSpeed data-parallel rank each); more than 1 needs mode=ray."""
    rollout_cpus: NonNegFloat = 1.0
    """CPUs per rollout worker."""
    rollout_gpus: Annotated[float | Literal["auto"], Range(ge=0)] = "auto"
    """GPUs per rollout worker; "auto": 1 on CUDA, 0 on CPU."""
    learner_cpus: NonNegFloat = 1.0
    """CPUs per learner rank."""
    learner_gpus: Annotated[float | Literal["auto"], Range(ge=0)] = "auto"
    """GPUs per learner rank; "auto": 1 on CUDA, 0 on CPU."""
    colocate: bool = False
    """Put rollout worker i and learner rank i in one placement-group bundle (same node, and on GPUs
    the same device, half each): for clusters where generation and training share GPUs."""
    cpu_linear: Literal["onednn", "torch"] = "onednn"
    """fp32 linear layers on CPU: "onednn" runs large products on oneDNN (1.1-1.5x MKL's sgemm, same
    fp32 arithmetic: dist_ft/model/onednn.py), "torch" on torch's default. Not GPUs, not bf16."""
    weight_transport: str = "auto"
    """How weight syncs reach the rollout workers: "auto" (in-process in local mode, Ray's object
    store on Ray), "inprocess", "object_store", "collective" (a gloo broadcast from learner rank
    0, on Ray: dist_ft/sync/collective.py), or a dist_ft.sync.WeightTransport subclass of
    yours as package.module:Class (dist_ft/sync/base.py says which calls it gets, and when)."""
    actor_timeout_s: PosFloat = 600.0
    """A rollout worker or learner rank that does not answer within this many seconds fails the run
    with its name, instead of hanging it."""
    max_restarts: NonNegInt = 3
    """Ray restarts a rollout worker that dies this many times; its lost groups are issued again."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "demo"
    """The run's name in metrics, wandb and the progress line."""
    steps: PosInt = 600
    """Learner steps to train."""
    seed: NonNegInt = 0
    """Seeds data order, sampling and initialisation: the same seed and config give the same run on
    one machine."""
    output_dir: str = "runs/demo"
    """Where the run writes config.yaml, metrics.jsonl, checkpoints and its final weights."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb runs offline unless asked: nothing leaves the machine by default."""
    wandb_project: str = "dist_ft"
    """The wandb project the run logs to."""
    plot: bool = True
    """Draw the run's curve to a PNG in output_dir at the end."""
    checkpoint_every: NonNegInt = 0
    """Run checkpoints (every rank's DeepSpeed state + the run state) every N steps; 0 = off."""
    eval_every: NonNegInt = 0
    """SFT and DPO: evaluate the data.eval_rows held-out rows every N steps and at the end; 0 off.
    """
    keep_checkpoints: NonNegInt = 2
    """0 keeps every one"""
    log_samples: NonNegInt = 8
    """GRPO: this many of a step's sampled completions (its first group's first) with prompt, answer
    and rewards, to samples.jsonl and wandb, every tenth of the run; 0 = none."""
    resume: str = "none"
    """"none", "auto" (the newest committed checkpoint under output_dir, if any) or a path."""
    resume_allow_changes: bool = False
    """Resuming refuses a config whose training semantics differ from the checkpoint's."""
    overwrite: bool = False
    """A fresh run refuses an output_dir that holds another run's metrics or checkpoints (they would
    mix, and resume=auto would pick the old run's); true removes the old outputs first."""
    deterministic: bool = False
    """Deterministic kernels and seeds: the same seed gives the same loss trajectory on CPU."""


@dataclass(frozen=True)
class LabelConfig:
    """``dist-ft label``: RLAIF preference pairs, the policy's samples judged by the judge."""

    output: str = ""
    """.jsonl or .parquet; "" = <run.output_dir>/labels.jsonl. Counts go to <stem>.meta.json."""
    min_margin: Annotated[float, Range(ge=-1, le=1)] = 0.1
    """A pair is kept when the judge's position-debiased margin for chosen over rejected (in [-1,
    1]: P(chosen named best | shown first) - P(rejected named best | shown first)) is at least
    this; the others are dropped and counted. The random-init tiny judge's are ~0.01."""
    prompts: NonNegInt = 0
    """the first this many good rows of data.source; 0 = all of them"""

    def __post_init__(self) -> None:
        if self.output and Path(self.output).suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"label.output={self.output}: use a .jsonl or .parquet path")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    peft: PeftSpec = field(default_factory=PeftSpec)
    """What trains (peft.method) and its knobs; only the trained set syncs to the rollout
    workers."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the prompts (or demonstrations, or pairs) come from and how they are rendered."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """How rollout workers sample: group size, budget, temperature, engine."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Multi-turn environments (none: single-turn prompts)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """How samples are scored: reward functions, the RLAIF judge, error policy."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Which objective runs and the prompts a step takes."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """GRPO's settings: loss variant, advantages, clipping, KL, warm-up, staleness."""
    dpo: DPOParams = field(default_factory=DPOParams)
    """DPO's settings (algo.objective=dpo only): loss variant, beta, label smoothing."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The DeepSpeed learner: optimizer, ZeRO stage, micro-batches."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """Where it runs: the only section that changes between a laptop, a Ray cluster and SLURM."""
    run: RunConfig = field(default_factory=RunConfig)
    """Steps, seed, outputs, logging, checkpoints."""
    label: LabelConfig = field(default_factory=LabelConfig)
    """`dist-ft label` only"""

    def __post_init__(self) -> None:
        # Cross-field rules only: the loader has checked every key's own range before this runs,
        # so nothing here divides by zero.
        if self.grpo.advantage not in ADVANTAGES:
            raise ConfigError(
                f"grpo.advantage={self.grpo.advantage!r}: one of {', '.join(ADVANTAGES)}",
                keys=("grpo.advantage",),
            )
        if self.algo.objective not in OBJECTIVES:
            raise ConfigError(
                f"algo.objective={self.algo.objective!r}: one of {', '.join(OBJECTIVES)}",
                keys=("algo.objective",),
            )
        grpo = self.algo.objective == "grpo"
        # DPO splits whole pairs; GRPO any sample (its advantages are computed before)
        whole = OBJECTIVES[self.algo.objective].whole_groups
        units = self.algo.prompts_per_step if whole else self.samples_per_step
        if units % (self.resources.learners * self.learner.micro_batches):
            what = {
                "grpo": "algo.prompts_per_step x rollout.group_size = {} samples",
                "sft": "algo.prompts_per_step = {} examples",
                "dpo": "algo.prompts_per_step = {} pairs",
            }.get(self.algo.objective, "algo.prompts_per_step x rows per prompt = {} rows")
            what = what.format(units)
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
        if grpo and self.grpo.sft_warmup_steps and self.data.source not in DEMO_SOURCES:
            raise ConfigError(
                f"grpo.sft_warmup_steps={self.grpo.sft_warmup_steps} is the built-in demo's "
                f"format warm-up; set grpo.sft_warmup_steps=0 for data.source={self.data.source}",
                keys=("grpo.sft_warmup_steps", "data.source"),
            )
        res = self.resources
        if res.rollout_workers != "auto" and (
            res.min_rollout_workers != 1 or res.max_rollout_workers
        ):
            raise ConfigError(
                "resources.min_rollout_workers and max_rollout_workers bound an elastic fleet: "
                f"set resources.rollout_workers=auto (it is {res.rollout_workers})",
                keys=(
                    "resources.rollout_workers",
                    "resources.min_rollout_workers",
                    "resources.max_rollout_workers",
                ),
            )
        if 0 < res.max_rollout_workers < res.min_rollout_workers:
            raise ConfigError(
                f"resources.max_rollout_workers={res.max_rollout_workers} is below "
                f"resources.min_rollout_workers={res.min_rollout_workers}",
                keys=("resources.min_rollout_workers", "resources.max_rollout_workers"),
            )
        if res.weight_transport == "collective" and self.grpo.max_staleness:
            # An actor runs one call at a time: a worker receives only after the rollouts it
            # holds, and rank 0's broadcast (so the learner) would wait for the slowest.
            raise ConfigError(
                "resources.weight_transport=collective broadcasts to every rollout worker at "
                "once, and with grpo.max_staleness="
                f"{self.grpo.max_staleness} they are still generating: use object_store (or "
                "auto) for async rollouts",
                keys=("resources.weight_transport", "grpo.max_staleness"),
            )
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
        if grpo and not self.reward.functions and self.env.name is None:  # fails late else
            raise ConfigError(
                "reward.functions is empty: name at least one reward function (or an "
                "environment, env.name, whose return is the reward)",
                keys=("reward.functions",),
            )
        for message, keys in peft_config_errors(self.peft):  # a peft key the method ignores
            raise ConfigError(message, keys=keys)
        if self.env.name is not None and not grpo:
            raise ConfigError(
                f"env.name runs episodes for GRPO (dist-ft train); algo.objective="
                f"{self.algo.objective} trains on a dataset: remove env.name",
                keys=("env.name", "algo.objective"),
            )
        # before any model loads: what vLLM cannot serve names itself here
        vllm = self.rollout.generator == "vllm"
        if vllm and (refusal := check_vllm(self.peft, self.grpo.beta)):
            message, keys = refusal
            raise ConfigError(message, keys=("rollout.generator", *keys))
        if self.peft.adapters and not grpo:
            raise ConfigError(
                f"peft.adapters trains one adapter per task group under GRPO (dist-ft train); "
                f"algo.objective={self.algo.objective} trains one adapter: remove "
                "peft.adapters",
                keys=("peft.adapters", "algo.objective"),
            )

    @property
    def samples_per_step(self) -> int:
        """Rows a learner step trains on: B x G samples, B examples, or B pairs' 2B answers."""
        rows = OBJECTIVES[self.algo.objective].rows_per_prompt or self.rollout.group_size
        return self.algo.prompts_per_step * rows

    @property
    def micro_batch_size(self) -> int:
        """Samples per learner micro-batch, derived: B x G / learners / micro_batches."""
        return self.samples_per_step // (self.resources.learners * self.learner.micro_batches)
