"""What a policy is made of, without torch: the ``peft:`` section (``PeftSpec``) and its checks,
each method's learning-rate ratio, the artefact file names, and the model-directory check the CLI
runs before anything heavy loads. The config imports this; torch is not loaded by it."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeAlias

from dist_ft.ranges import PosInt, Range

DType = Literal["float32", "bfloat16", "float16"]  # a model's parameter dtype, by name
Device = Literal["cpu", "cuda"]  # where a component runs (resources.device, resolved)


class PeftMethod(str, enum.Enum):
    """What trains; ``dist_ft.model.peft`` builds each (its docstring has the table)."""

    NONE = "none"  # full fine-tuning
    LORA = "lora"
    DORA = "dora"
    QLORA = "qlora"  # LoRA on a 4-bit (nf4) base through bitsandbytes
    LORA_FA = "lora_fa"  # LoRA with A frozen (a fixed-seed random init): only B trains
    VERA = "vera"  # shared frozen random A/B, per-layer trainable scaling vectors
    IA3 = "ia3"  # learned per-channel scales on keys, values and the FFN
    PREFIX = "prefix"  # prefix tuning: trainable key/value prefixes in every layer
    BITFIT = "bitfit"  # biases only (zero biases added where a linear layer has none)
    ADAPTER = "adapter"  # bottleneck adapter layers (Houlsby / Pfeiffer)


@dataclass(frozen=True)
class PeftSpec:
    """What trains and what syncs: the ``peft:`` section of a config, and what learners and
    rollout workers build their policy from."""

    method: PeftMethod = PeftMethod.LORA
    """What trains: none (full fine-tuning), lora, dora, qlora, lora_fa, vera, ia3, prefix, bitfit
    or adapter."""
    r: PosInt = 16
    """LoRA defaults follow Thinking Machines' "LoRA Without Regret" (Schulman et al., 2025): LoRA
    on every linear layer (MLP included; attention-only LoRA underperforms even at matched
    parameter count), and for RL even rank 1 matches full fine-tuning because a policy-gradient
    episode carries ~1 bit, so r=16 leaves headroom for SFT warm-up at little cost. alpha=32
    fixed with peft's alpha/r scaling makes the best learning rate nearly independent of r, at
    ~10x the full fine-tuning rate (learner.lr: auto picks it). r is also VeRA's shared rank and
    the bottleneck adapter's width."""
    alpha: PosInt = 32
    """LoRA's alpha; the update is scaled by alpha / r."""
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """>0 makes learner and rollout logprobs differ at ratio 1"""
    target_modules: str | list[str] = "all-linear"
    """"all-linear" is peft's shortcut for every linear layer except the output head."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full next to the adapter and shipped with it (e.g. lm_head when the
    vocabulary changed). Empty keeps the adapter pure low-rank."""
    num_virtual_tokens: PosInt = 16
    """prefix: virtual tokens per layer (each a key and a value vector per layer)."""
    adapter_style: Literal["houlsby", "pfeiffer"] = "houlsby"
    """adapter: "houlsby" puts a bottleneck after every attention and MLP block, "pfeiffer" after
    every MLP block only (half the adapters, about the same quality in Pfeiffer 2020)."""
    adapters: dict[str, list[str]] = field(default_factory=dict)
    """Several adapters on one base (lora, dora, qlora): {name: [data tasks]}. GRPO trains them in
    turn, a step each (step s trains the ((s - 1) mod n)-th, on prompts of its tasks alone);
    workers generate each step with its adapter, and a sync carries the adapters changed since
    the last one. {} = one adapter for every task."""


class TinyShape(Protocol):
    """The built-in tiny model's shape (config's ``model.tiny``). Read-only members, so that a
    frozen dataclass is one."""

    @property
    def hidden_size(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def seed(self) -> int: ...


# A transformers model, or peft's wrapper of one: an nn.Module whose own methods (generate,
# config, get_base_model, save_pretrained; peft_config, set_adapter, disable_adapter) mypy
# sees through nn.Module.__getattr__ as Tensor | Module, and that transformers' stubs type
# too strictly (a model's .to(device)). Any, where such a model is held or its methods called.
HFModel: TypeAlias = Any


# What a local HF model directory must hold, each as "any of these globs". Without the check an
# empty or half-downloaded folder fails inside transformers (e.g. a sentencepiece error).
_MODEL_FILES = {
    "config.json": ("config.json",),
    "tokenizer files (tokenizer.json, tokenizer.model, vocab.json or vocab.txt)": (
        "tokenizer.json",
        "tokenizer.model",
        "vocab.json",
        "vocab.txt",
        "*.tiktoken",
    ),
    "weights (*.safetensors or *.bin)": ("*.safetensors", "*.bin"),
}


def check_model_path(path: str, key: str = "model.path") -> None:
    """Raise FileNotFoundError naming ``key``, the directory and what it lacks, unless ``path``
    is "tiny" or a local directory with a config, a tokenizer and weights."""
    if path == "tiny":
        return
    fetch = f"fetch the model with `hf download ID --local-dir {path}`"
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"{key}={path} is not a local directory (dist_ft never downloads from a hub); "
            f"{fetch}, or set {key} to a local model directory"
        )
    missing = [
        what
        for what, globs in _MODEL_FILES.items()
        if not any(next(Path(path).glob(g), None) for g in globs)
    ]
    if missing:
        raise FileNotFoundError(
            f"{key}={path} is not a complete HF model directory: it has no "
            f"{', no '.join(missing)}; {fetch}"
        )


# Set on a policy whose trainable set dist_ft built (bitfit, adapter): its value is the method.
# is_adapter / export_state / import_state see it; peft models carry ``peft_config`` instead.
TRAINABLE_SET = "dist_ft_trainable_set"  # models.is_adapter checks this name


# dist_ft's artefact format for the methods peft lacks (bitfit, adapter)
WEIGHTS_FILE = "dist_ft_adapter.safetensors"


CONFIG_FILE = "dist_ft_adapter.json"


PEFT_WEIGHTS_FILE = "adapter_model.safetensors"  # peft's own save_pretrained


# What each method reads from ``peft:`` besides ``method``; a non-default value of any other
# key (r and alpha excepted) is refused at config load (see :func:`config_errors`).
USES: dict[PeftMethod, set[str]] = {
    PeftMethod.NONE: set(),
    PeftMethod.LORA: {"r", "alpha", "dropout", "target_modules", "modules_to_save", "adapters"},
    PeftMethod.DORA: {"r", "alpha", "dropout", "target_modules", "modules_to_save", "adapters"},
    PeftMethod.QLORA: {"r", "alpha", "dropout", "target_modules", "modules_to_save", "adapters"},
    PeftMethod.LORA_FA: {"r", "alpha", "dropout", "target_modules", "modules_to_save"},
    PeftMethod.VERA: {"r", "dropout", "target_modules", "modules_to_save"},
    PeftMethod.IA3: {"target_modules", "modules_to_save"},
    PeftMethod.PREFIX: {"num_virtual_tokens"},
    PeftMethod.BITFIT: {"target_modules"},
    PeftMethod.ADAPTER: {"r", "adapter_style"},
}


# learner.lr=auto. Thinking Machines' "LoRA Without Regret" (2025) finds LoRA's best rate ~10x
# full fine-tuning's, nearly independent of r under alpha/r scaling (so LoRA-FA, DoRA and QLoRA
# share it). The other ratios are rough, from the rates each method's paper trained at next to
# full fine-tuning: VeRA's vectors ~10x LoRA's; (IA)^3 (T-Few) 3e-3; prefix tuning without its
# MLP at prompt-tuning rates (~1e-2); BitFit and bottleneck adapters ~10x full fine-tuning.
# The base is the full fine-tuning rate at which the tiny demo's tuned LoRA rate (1e-3) is 10x;
# a real model wants its own (configs/grpo_lora_qwen2.5-0.5b.yaml sets 2e-5).
FULL_FT_LR = 1e-4


LR_MULTIPLIER: dict[PeftMethod, float] = {
    PeftMethod.NONE: 1.0,
    PeftMethod.LORA: 10.0,
    PeftMethod.DORA: 10.0,
    PeftMethod.QLORA: 10.0,
    PeftMethod.LORA_FA: 10.0,
    PeftMethod.VERA: 100.0,
    PeftMethod.IA3: 30.0,
    PeftMethod.PREFIX: 100.0,
    PeftMethod.BITFIT: 10.0,
    PeftMethod.ADAPTER: 10.0,
}


def auto_lr(method: PeftMethod) -> float:
    """``learner.lr: auto``: the learning rate for ``method`` (see ``LR_MULTIPLIER``)."""
    return FULL_FT_LR * LR_MULTIPLIER[method]


def config_errors(spec: PeftSpec) -> list[tuple[str, tuple[str, ...]]]:
    """``peft:`` values that dist_ft refuses before any model loads: ``[(message, dotted keys
    at fault)]``. A key the method does not read is refused when set away from its default
    (a user who sets ``peft.dropout`` for ia3 expects regularisation it never gets); ``r`` and
    ``alpha`` are let through, so a LoRA YAML can switch method with one override."""
    errors: list[tuple[str, tuple[str, ...]]] = []
    defaults = PeftSpec()
    unread = vars(spec).keys() - {"method", "r", "alpha"} - USES[spec.method]
    for key in sorted(unread):
        if getattr(spec, key) != getattr(defaults, key):
            reads = sorted(USES[spec.method]) or "no other peft key"
            errors.append(
                (
                    f"peft.{key}={getattr(spec, key)!r} has no effect with "
                    f"peft.method={spec.method.value} (it reads {reads}); remove peft.{key} "
                    "or pick a method that uses it",
                    (f"peft.{key}", "peft.method"),
                )
            )
    errors += adapter_errors(spec.adapters)
    return errors


ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def adapter_errors(adapters: dict[str, list[str]]) -> list[tuple[str, tuple[str, ...]]]:
    """``peft.adapters`` must map module-name-safe adapter names to disjoint, non-empty task
    lists (a task's prompts are generated and trained with exactly one adapter)."""
    errors: list[tuple[str, tuple[str, ...]]] = []
    owner: dict[str, str] = {}
    for name, tasks in adapters.items():
        key = f"peft.adapters.{name}"
        if not ADAPTER_NAME.fullmatch(name):
            errors.append(
                (
                    f"{key}: an adapter name must be a Python identifier (peft makes it a module "
                    "name)",
                    (key,),
                )
            )
        if not tasks:
            errors.append((f"{key}: name the data tasks this adapter trains on", (key,)))
        for task in tasks:
            if task in owner:
                errors.append(
                    (
                        f"{key}: task {task!r} is already adapter {owner[task]!r}'s; a task "
                        "belongs to one adapter",
                        (key, f"peft.adapters.{owner[task]}"),
                    )
                )
            owner.setdefault(task, name)
    return errors
