"""Model and tokenizer loading from local directories, PEFT wrapping, weight export/import.

Rollout workers and learners both build their policy here, so their parameter names, dtypes and
logprob computation agree by construction (the weight-sync fingerprint depends on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_ft.algos.common import token_logprobs
from dist_ft.config import PeftConfig, PeftMethod, TinyModelConfig

# transformers (and dist_ft.tiny, which needs it) is imported where used: the CLI checks model
# directories with check_model_path before anything heavy loads.

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


def resolve_model_path(path: str, tiny: TinyModelConfig, key: str = "model.path") -> str:
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
    peft: PeftConfig,
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
    if peft.method is not PeftMethod.QLORA:
        model.to(device)
    if peft.method is PeftMethod.NONE:
        return model

    from peft import get_peft_model

    model = get_peft_model(model, lora_config(peft))
    if peft.method is PeftMethod.QLORA:
        _keep_4bit_trainable(model)
    return model


def lora_config(peft: PeftConfig) -> Any:
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


def _keep_4bit_trainable(model: nn.Module) -> None:
    # bitsandbytes on CPUs with AVX512-BF16 repacks 4-bit weights into an inference-only layout
    # on the first eval forward; after that LoRA gets no gradient and no error is raised.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def sync_bytes(config: Any, peft: PeftConfig, dtype: str) -> dict[str, int]:
    """Bytes one weight sync carries for a model of this HF config, without loading weights:
    the model is built on the meta device and the adapter applied to it.

    Returns ``{"full": every weight, "adapter": trainable adapter tensors}`` in ``dtype``.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    size = torch.finfo(DTYPES[dtype]).bits // 8
    full = sum(p.numel() for p in model.parameters()) * size  # a tied tensor counts once
    adapted = get_peft_model(model, lora_config(peft))
    adapter = sum(p.numel() for p in adapted.parameters() if p.requires_grad) * size
    return {"full": full, "adapter": adapter}


def is_adapter(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def export_state(model: nn.Module, adapter_only: bool) -> dict[str, torch.Tensor]:
    """What a weight sync carries: the adapter alone for PEFT models, else every weight.

    Under ZeRO-3 the caller must gather parameters first. Tensors are detached CPU copies.
    """
    if adapter_only:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    else:
        base = model.get_base_model() if is_adapter(model) else model
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
    if adapter_only:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, tensors)
        if result.unexpected_keys:
            raise KeyError(f"adapter sync has unknown tensors: {result.unexpected_keys[:5]}")
        return
    base = model.get_base_model() if is_adapter(model) else model
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
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    p = prompt_ids_NP.shape[1]
    # logits at position i predict token i + 1: the completion is predicted from p - 1 onward.
    logits_NTV = logits[:, p - 1 : -1, :] / temperature
    return token_logprobs(logits_NTV, completion_ids_NT)
