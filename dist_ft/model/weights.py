"""Weights in and out of a policy: what a sync carries (``export_state``, ``import_state``), its
size without loading (``sync_bytes``), and the saved final artefact (``save_artefact``,
``load_artefact``; dist_ft's own format for the methods peft lacks)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_ft.model.loading import DTYPES, hold_in_dtype
from dist_ft.model.peft import (
    apply_method,
    by_adapter,
    is_trainable_set,
    load_trainable_state,
    trainable_state,
)
from dist_ft.model.spec import (
    CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    TRAINABLE_SET,
    USES,
    WEIGHTS_FILE,
    HFModel,
    PeftMethod,
    PeftSpec,
)


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
        state: dict[str, torch.Tensor] = {
            n: p for n, p in model.named_parameters() if p.requires_grad
        }
    else:
        state = trainable_state(model)
    adapter = sum(t.numel() * t.element_size() for t in state.values())
    return {"full": full, "adapter": adapter}


def is_adapter(model: nn.Module) -> bool:
    """Whether a sync carries the trainable set alone: peft's adapter, or the set dist_ft built
    for a method peft lacks (bitfit, adapter; see ``peft_methods.TRAINABLE_SET``)."""
    return hasattr(model, "peft_config") or hasattr(model, "dist_ft_trainable_set")


def export_state(
    model: HFModel, adapter_only: bool, adapters: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """What a weight sync carries: the adapter alone for PEFT models, else every weight.
    ``adapters``: of a policy with several (``peft.adapters``), these alone (None: all).

    Under ZeRO-3 the caller must gather parameters first. Tensors are detached CPU copies.
    """
    if adapter_only:  # the trainable set alone (see peft_methods)
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


def import_state(model: HFModel, tensors: dict[str, torch.Tensor], adapter_only: bool) -> None:
    """Load a weight sync into ``model``; any missing or unexpected name is an error."""
    if adapter_only and not hasattr(model, "peft_config"):  # bitfit, adapter: dist_ft's set
        load_trainable_state(model, tensors)
        return
    if adapter_only:
        from peft import set_peft_model_state_dict

        for adapter, part in by_adapter(model, tensors).items():
            # Any: peft annotates the result as the namedtuple factory; it is torch's load result
            loaded: Any = set_peft_model_state_dict(model, part, adapter_name=adapter)
            # prefix tuning: peft loads "prompt_embeddings" into its prompt encoder itself, yet
            # reports it unexpected by the module's load_state_dict
            unexpected = [k for k in loaded.unexpected_keys if k != "prompt_embeddings"]
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


def save_artefact(model: HFModel, out_dir: str | Path, spec: PeftSpec | None = None) -> None:
    """The trained result. peft methods: peft's ``save_pretrained`` (``adapter_config.json`` +
    ``adapter_model.safetensors``). bitfit and adapter, dist_ft's format:
    ``dist_ft_adapter.safetensors`` holds the trainable set under the base model's parameter
    names (``model.layers.0.self_attn.q_proj.bias``, ``model.layers.0.mlp.bottleneck.up.weight``)
    and ``dist_ft_adapter.json`` the ``peft:`` section that rebuilds the structure
    (``load_policy(base, dtype, PeftSpec(**json["peft"]), ...)``, then :func:`load_artefact`).
    Full fine-tuning: the whole model through HF ``save_pretrained``. Under ZeRO-3 the caller
    gathers first. Sealed last (``export.seal``: MANIFEST.json of sha256s, umask modes)."""
    from dist_ft.run.artefacts import seal

    if not is_trainable_set(model):
        model.save_pretrained(str(out_dir), safe_serialization=True)
    else:
        _save_trainable_set(model, Path(out_dir), spec)
    seal(out_dir)


def _save_trainable_set(model: nn.Module, out: Path, spec: PeftSpec | None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = trainable_state(model)
    tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in state.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    peft: dict[str, Any] = {"method": getattr(model, TRAINABLE_SET)}
    if spec is not None:
        peft = {k: v for k, v in vars(spec).items() if k in USES[spec.method] | {"method"}}
        peft["method"] = spec.method.value
    base = getattr(getattr(model, "config", None), "_name_or_path", None)
    (out / CONFIG_FILE).write_text(json.dumps({"peft": peft, "base_model": base}, indent=2) + "\n")


def load_artefact(model: nn.Module, out_dir: str | Path) -> None:
    """Load what :func:`save_artefact` wrote for a PEFT method into a policy built with the same
    ``peft:`` spec; an unexpected tensor is an error (a missing one too, for bitfit/adapter)."""
    from safetensors.torch import load_file

    name = WEIGHTS_FILE if is_trainable_set(model) else PEFT_WEIGHTS_FILE
    import_state(model, load_file(str(Path(out_dir) / name)), adapter_only=True)
