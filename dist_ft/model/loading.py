"""Model and tokenizer loading from local directories, PEFT wrapping, weight export/import.

Rollout workers and learners both build their policy here, so their parameter names, dtypes and
logprob computation agree by construction (the weight-sync fingerprint depends on it).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

# transformers (and dist_ft.model.tiny, which needs it) is imported where used: the CLI checks model
# directories with check_model_path before anything heavy loads.
from dist_ft.model.peft import apply_method
from dist_ft.model.spec import HFModel, PeftMethod, PeftSpec, TinyShape, check_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str, tiny: TinyShape, key: str = "model.path") -> str:
    """``"tiny"`` builds (once per machine) the built-in model; anything else must be a complete
    local model directory (see :func:`check_model_path`)."""
    check_model_path(path, key)
    if path != "tiny":
        return path
    from dist_ft.model.tiny import ensure_tiny_model

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
    model: HFModel = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if peft.method is PeftMethod.QLORA:
        _release_checkpoint_map(model)
    else:
        model.to(device)
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
