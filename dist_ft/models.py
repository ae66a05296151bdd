"""Model and tokenizer loading from local directories, PEFT wrapping, weight export/import.

Rollout workers and learners both build their policy here, so their parameter names, dtypes and
logprob computation agree by construction (the weight-sync fingerprint depends on it).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import torch
from torch import nn

from dist_ft.algos.common import token_logprobs
from dist_ft.ranges import PosInt, Range

# transformers (and dist_ft.tiny, which needs it) is imported where used: the CLI checks model
# directories with check_model_path before anything heavy loads.


class PeftMethod(str, enum.Enum):
    """What trains; ``dist_ft.peft_methods`` builds each (its docstring has the table)."""

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
    # LoRA defaults follow Thinking Machines' "LoRA Without Regret" (Schulman et al., 2025):
    # LoRA on every linear layer (MLP included; attention-only LoRA underperforms even at
    # matched parameter count), and for RL even rank 1 matches full fine-tuning because a
    # policy-gradient episode carries ~1 bit, so r=16 leaves headroom for SFT warm-up at little
    # cost. alpha=32 fixed with peft's alpha/r scaling makes the best learning rate nearly
    # independent of r, at ~10x the full fine-tuning rate (learner.lr: auto picks it).
    # r is also VeRA's shared rank and the bottleneck adapter's width.
    r: PosInt = 16
    alpha: PosInt = 32
    # >0 makes learner and rollout logprobs differ at ratio 1
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    # "all-linear" is peft's shortcut for every linear layer except the output head.
    target_modules: str | list[str] = "all-linear"
    # Modules trained in full next to the adapter and shipped with it (e.g. lm_head when the
    # vocabulary changed). Empty keeps the adapter pure low-rank.
    modules_to_save: list[str] = field(default_factory=list)
    # prefix: virtual tokens per layer (each a key and a value vector per layer).
    num_virtual_tokens: PosInt = 16
    # adapter: "houlsby" puts a bottleneck after every attention and MLP block, "pfeiffer"
    # after every MLP block only (half the adapters, about the same quality in Pfeiffer 2020).
    adapter_style: Literal["houlsby", "pfeiffer"] = "houlsby"
    # Several adapters on one base (lora, dora, qlora): {name: [data tasks]}. GRPO trains them
    # in turn, a step each (step s trains the ((s - 1) mod n)-th, on prompts of its tasks
    # alone); workers generate each step with its adapter, and a sync carries the adapters
    # changed since the last one. {} = one adapter for every task.
    adapters: dict[str, list[str]] = field(default_factory=dict)


class TinyShape(Protocol):
    """The built-in tiny model's shape (config's ``model.tiny``)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    seed: int


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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


def resolve_model_path(path: str, tiny: TinyShape, key: str = "model.path") -> str:
    """``"tiny"`` builds (once per machine) the built-in model; anything else must be a complete
    local model directory (see :func:`check_model_path`)."""
    check_model_path(path, key)
    if path != "tiny":
        return path
    from dist_ft.tiny import ensure_tiny_model

    return str(ensure_tiny_model(tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.seed))


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends on the right
    return tok


def load_policy(
    path: str,
    dtype: str,
    peft: PeftSpec,
    device: torch.device,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The policy: the base model, wrapped by peft unless ``peft.method`` is ``none``."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if peft.method is PeftMethod.QLORA:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype]
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if peft.method is PeftMethod.QLORA:
        _release_checkpoint_map(model)
    else:
        model.to(device)
    from dist_ft.peft_methods import apply_method

    model = apply_method(model, peft)
    hold_in_dtype(model, DTYPES[dtype])
    return model


def hold_in_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter to ``dtype``, the adapter's included; buffers keep theirs.

    peft upcasts a bf16/fp16 adapter to fp32 (``get_peft_model``'s ``autocast_adapter_dtype``),
    and DeepSpeed's bf16/fp16 mode casts it back on the learner, parameters only. A rollout
    worker left with peft's fp32 adapter would upcast every bf16 sync on load: it would hold
    bytes other than those sent and compute the adapter in another dtype than the learner.
    Casting exactly as DeepSpeed does gives learner and workers the same dtypes.
    """
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def lora_config(peft: PeftSpec) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=peft.target_modules,
        modules_to_save=list(peft.modules_to_save) or None,
        use_dora=peft.method is PeftMethod.DORA,
        task_type="CAUSAL_LM",
    )


def _release_checkpoint_map(model: nn.Module) -> None:
    """Give back what loading a 4-bit base on CPU leaves resident. Two things, measured on a
    Qwen2.5-0.5B-shaped model (RSS after loading):

    - The weights bitsandbytes leaves unquantised (embeddings, norms) are views into the
      memory-mapped safetensors file; while one lives, every page the quantisation read stays
      mapped: ~850 MiB of fp32 checkpoint. They are copied out, and the mapping goes.
    - Quantising allocates and frees an fp32 copy of each weight; glibc kept ~1 GiB of that
      freed heap on 1 load in 2 until ``malloc_trim`` returned it.

    3,000-3,500 MiB without either, 2,000 with the trim alone, 1,154 with both (every run).
    """
    import ctypes
    import gc

    import bitsandbytes as bnb

    for p in model.parameters():  # each once: a tied embedding and head are one parameter
        if not isinstance(p, bnb.nn.Params4bit) and p.device.type == "cpu":
            p.data = p.data.clone()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _keep_4bit_trainable(model: nn.Module) -> None:
    # bitsandbytes on CPUs with AVX512-BF16 repacks 4-bit weights into an inference-only layout
    # on the first eval forward; after that LoRA gets no gradient and no error is raised.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def sync_bytes(config: Any, peft: PeftSpec, dtype: str) -> dict[str, int]:
    """Bytes one weight sync carries for a model of this HF config, without loading weights:
    the model is built on the meta device and ``peft.method`` applied to it by the builder
    ``load_policy`` uses (``peft_methods.apply_method``).

    Returns ``{"full": every weight (a sync under peft.method=none), "adapter": the trainable
    set (``export_state(model, adapter_only=True)``: every weight for none)}``, parameters in
    ``dtype`` as ``load_policy`` holds them. qlora is counted as lora: its base cannot be
    quantised on the meta device, and it syncs the same LoRA adapter in ``dtype`` (the 4-bit
    base never syncs).
    """
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from dist_ft.peft_methods import apply_method, trainable_state

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    # export_state's full sync is the state dict less tied aliases: each parameter once, plus
    # the persistent buffers (in their own dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    persistent = [buffers[n] for n in model.state_dict() if n not in params]
    full += sum(b.numel() * b.element_size() for b in persistent)
    # the builders add their tensors on the device of the weights they adapt: meta
    built = replace(peft, method=PeftMethod.LORA) if peft.method is PeftMethod.QLORA else peft
    model = apply_method(model, built)
    hold_in_dtype(model, DTYPES[dtype])
    if peft.method is PeftMethod.PREFIX:
        # peft syncs the prompt encoder's output for its virtual tokens (computed on the CPU,
        # which a meta tensor cannot reach); without the projection MLP (dist_ft never sets
        # it) that is the encoder's embedding table, the trainable parameter itself
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    else:
        state = trainable_state(model)
    adapter = sum(t.numel() * t.element_size() for t in state.values())
    return {"full": full, "adapter": adapter}


def is_adapter(model: nn.Module) -> bool:
    """Whether a sync carries the trainable set alone: peft's adapter, or the set dist_ft built
    for a method peft lacks (bitfit, adapter; see ``peft_methods.TRAINABLE_SET``)."""
    return hasattr(model, "peft_config") or hasattr(model, "dist_ft_trainable_set")


def export_state(
    model: nn.Module, adapter_only: bool, adapters: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """What a weight sync carries: the adapter alone for PEFT models, else every weight.
    ``adapters``: of a policy with several (``peft.adapters``), these alone (None: all).

    Under ZeRO-3 the caller must gather parameters first. Tensors are detached CPU copies.
    """
    if adapter_only:  # the trainable set alone (see peft_methods)
        from dist_ft.peft_methods import trainable_state

        state = trainable_state(model, adapters)
    else:
        base = model.get_base_model() if hasattr(model, "peft_config") else model
        state = base.state_dict()
        tied = tied_aliases(state)
        state = {k: v for k, v in state.items() if k not in tied}
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def tied_aliases(state: dict[str, torch.Tensor]) -> set[str]:
    """Names in a state dict that share storage with an earlier name (tied embeddings): a full
    sync sends the tensor once; loading it updates both names."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    aliases = set()
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape))
        if t.numel() and key in seen:
            aliases.add(name)
        seen.add(key)
    return aliases


def import_state(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_only: bool) -> None:
    """Load a weight sync into ``model``; any missing or unexpected name is an error."""
    if adapter_only and not hasattr(model, "peft_config"):  # bitfit, adapter: dist_ft's set
        from dist_ft.peft_methods import load_trainable_state

        load_trainable_state(model, tensors)
        return
    if adapter_only:
        from peft import set_peft_model_state_dict

        from dist_ft.peft_methods import by_adapter

        for adapter, part in by_adapter(model, tensors).items():
            result = set_peft_model_state_dict(model, part, adapter_name=adapter)
            # prefix tuning: peft loads "prompt_embeddings" into its prompt encoder itself, yet
            # reports it unexpected by the module's load_state_dict
            unexpected = [k for k in result.unexpected_keys if k != "prompt_embeddings"]
            if unexpected:
                raise KeyError(f"adapter sync has unknown tensors: {unexpected[:5]}")
        return
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    result = base.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys) - tied_aliases(base.state_dict())
    if missing or result.unexpected_keys:
        raise KeyError(
            f"weight sync does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def completion_logprobs(
    model: nn.Module,
    prompt_ids_NP: torch.Tensor,
    prompt_mask_NP: torch.Tensor,
    completion_ids_NT: torch.Tensor,
    completion_mask_NT: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Logprob of every completion token under ``model`` at the sampling temperature. [N, T].

    Positions are counted from the first real token, as ``generate`` does under left padding, so
    the rollout's behaviour logprobs and the learner's match to float tolerance.
    """
    ids = torch.cat([prompt_ids_NP, completion_ids_NT], dim=1).long()
    mask = torch.cat([prompt_mask_NP, completion_mask_NT], dim=1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Logits at position i predict token i + 1: the completion is predicted from the last prompt
    # position onward, so only the last T + 1 positions go through the output layer (a 49k-vocab
    # head is a fifth of a small model's FLOPs per token; the prompt's logits are never used).
    t = completion_ids_NT.shape[1]
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=t + 1
    ).logits  # [N, T + 1, V]
    # counted from the end: a remote-code model that ignores logits_to_keep returns them all
    return token_logprobs(logits[:, -(t + 1) : -1, :], completion_ids_NT, temperature)


def shares_prompt_cache(peft: PeftSpec) -> bool:
    """Whether a prompt's KV cache, computed once, may serve its G samples (the rollout's
    shared prefill, the learner's :func:`group_logprobs`): not under prefix tuning, whose
    virtual tokens peft puts first in the cache."""
    return peft.method is not PeftMethod.PREFIX


def group_logprobs(
    model: nn.Module,
    prompt_ids_BP: torch.Tensor,
    prompt_mask_BP: torch.Tensor,
    group_ids_N: torch.Tensor,
    completion_ids_NT: torch.Tensor,
    completion_mask_NT: torch.Tensor,
    temperature: float = 1.0,
    share_prompts: bool = True,
) -> torch.Tensor:
    """:func:`completion_logprobs` of samples that share prompts: [N, T], sample i continuing
    prompt row ``group_ids_N[i]`` of the [Bg, P] table. With ``share_prompts`` each prompt runs
    through the model once, and its KV cache is indexed out to its samples, which run their
    completions against it; without it (or when no prompt has two samples) every sample runs
    its own copy, as :func:`completion_logprobs` does.

    A GRPO group's G samples share one prompt. The padded forward runs it G times, forward and
    backward; here it runs once, and the G completions' gradients meet in its KV cache. On the
    peer bench (SmolLM2, ~33 prompt tokens, G=4, 16 new tokens) that is half the learner's
    FLOPs. The arithmetic is the one ``generate`` does (prefill, then the new tokens against the
    cache), so it agrees with the rollout's sampling-pass logprobs at least as closely as the
    padded forward does. Not for prefix tuning (peft's virtual tokens must come first in the
    cache), nor for a model that takes no ``past_key_values``.
    """
    if not share_prompts or len(group_ids_N) <= len(prompt_ids_BP):
        return completion_logprobs(
            model,
            prompt_ids_BP[group_ids_N],
            prompt_mask_BP[group_ids_N],
            completion_ids_NT,
            completion_mask_NT,
            temperature,
        )
    from transformers import DynamicCache

    t = completion_ids_NT.shape[1]
    positions_BP = (prompt_mask_BP.cumsum(-1) - 1).clamp(min=0)
    # the model's config (sliding-window layers need it), under a DeepSpeed engine's wrapper too
    cache = DynamicCache(config=getattr(model, "module", model).config)
    # the last prompt position's logits predict each sample's first token: [Bg, 1, V]
    first_B1V = model(
        input_ids=prompt_ids_BP.long(),
        attention_mask=prompt_mask_BP.long(),
        position_ids=positions_BP,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1:]
    group_ids_N = group_ids_N.long().to(prompt_ids_BP.device)
    first_N1 = token_logprobs(first_B1V[group_ids_N], completion_ids_NT[:, :1], temperature)
    if t == 1:
        return first_N1
    # [Bg, ...] -> [N, ...] in every layer; differentiable, so each prompt's gradient is the sum
    # over its samples
    cache.reorder_cache(group_ids_N)
    prompt_mask_NP = prompt_mask_BP[group_ids_N].long()
    start_N1 = prompt_mask_NP.sum(-1, keepdim=True)  # the first completion token's position
    rest_NTV = model(
        input_ids=completion_ids_NT[:, :-1].long(),
        attention_mask=torch.cat([prompt_mask_NP, completion_mask_NT[:, :-1].long()], dim=1),
        position_ids=start_N1 + torch.arange(t - 1, device=start_N1.device),
        past_key_values=cache,
        use_cache=True,
    ).logits  # [N, T - 1, V]
    # the two parts' logprobs side by side, not their logits: no [N, T, V] copy
    rest_NT = token_logprobs(rest_NTV, completion_ids_NT[:, 1:], temperature)
    return torch.cat([first_N1, rest_NT], dim=1)


def packed_completion_logprobs(
    model: nn.Module,
    prompt_ids_NP: torch.Tensor,
    prompt_mask_NP: torch.Tensor,
    completion_ids_NT: torch.Tensor,
    completion_spans_NT: torch.Tensor,
    temperature: float = 1.0,
    mask_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`completion_logprobs` with the rows packed (``packing.pack_episodes``): the same
    [N, T] logprobs from one forward over fewer rows and no padding tokens.

    Each example keeps the positions it has alone (they restart at 0, as the padded forward's
    count from the first real token), and the block-causal mask keeps it from attending to the
    others, so its logprobs equal the padded forward's to float error. ``mask_dtype`` is the
    model's compute dtype: the additive mask must match the attention scores' (sdpa refuses
    another float dtype). Not for prefix tuning: peft concatenates its prefix's columns to a 2D
    mask, which a 4D mask cannot take. Nor for flash-attention 2, which takes no 4D mask.
    """
    from dist_ft.batch import Span
    from dist_ft.packing import block_causal_mask, pack_episodes

    real_NT = completion_spans_NT != Span.PAD
    length_N = prompt_mask_NP.sum(-1) + real_NT.sum(-1)
    if len(length_N) < 2 or int(length_N.topk(2, largest=False).values.sum()) > length_N.max():
        # No two examples fit in one row (equal lengths, say): packing would save no token,
        # yet costs its layout (~2 ms for 32 rows) and an explicit 4D mask in attention. The
        # tiny model's demo batch, 32 rows of 14 tokens, took 39 ms an SFT step packed, 33 padded.
        return completion_logprobs(
            model, prompt_ids_NP, prompt_mask_NP, completion_ids_NT, real_NT, temperature
        )
    device = completion_ids_NT.device
    packed, source_NT = pack_episodes(
        prompt_ids_NP.long(), prompt_mask_NP, completion_ids_NT.long(), completion_spans_NT
    )
    logits_RTV = model(
        input_ids=packed.ids_NT.to(device),
        attention_mask=block_causal_mask(packed.example_ids_NT.to(device), mask_dtype),
        position_ids=packed.position_ids_NT.to(device),
    ).logits
    out = logits_RTV.device
    # only the scoring positions go through the vocabulary softmax: [M, V], M episode tokens
    logits_MV = logits_RTV.flatten(0, 1)[source_NT[real_NT].to(out)]
    logp_M = token_logprobs(logits_MV, completion_ids_NT[real_NT].to(out), temperature)
    out_NT = torch.zeros(completion_ids_NT.shape, dtype=logp_M.dtype, device=out)
    return out_NT.masked_scatter(real_NT.to(out), logp_M)
