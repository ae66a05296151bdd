"""What the vLLM engine (``rollout/vllm_engine.py``) is configured with and what it serves,
without importing it: the config checks a run against it before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from dist_ft.model.spec import PeftMethod, PeftSpec
from dist_ft.ranges import PosFloat, PosInt, Range

# what the vLLM engine serves: a plain LoRA adapter, or every weight
SERVED = (PeftMethod.LORA, PeftMethod.NONE)


@dataclass(frozen=True)
class VLLMOptions:
    """The vLLM engine (rollout.generator=vllm): one per rollout worker, in a child process."""

    python: str = "auto"
    """The interpreter that has vLLM: "auto" is this one when it imports vllm, else the
    .venv-vllm beside this environment (`make vllm-env`); or a path."""
    max_model_len: PosInt | None = None
    """Prompt + completion tokens the engine plans for; None: the model's maximum."""
    kv_cache_gib: PosInt = 1
    """CPU: GiB of KV cache each engine allocates."""
    gpu_memory_utilization: Annotated[float, Range(gt=0, le=1)] = 0.3
    """GPU: the share of its device's memory each engine takes (weights and KV cache); the rest
    is left to a learner colocated on the device."""
    start_timeout_s: PosFloat = 600.0
    """Seconds an engine may take to start before its worker fails with the engine log's tail."""


def check_vllm(peft: PeftSpec, beta: float) -> tuple[str, tuple[str, ...]] | None:
    """Why the vLLM engine cannot serve this run, and the config keys at fault; None when it
    can."""
    if peft.method not in SERVED:
        served = ", ".join(m.value for m in SERVED)
        return (
            f"peft.method={peft.method.value}: rollout.generator=vllm serves {served} only "
            "(vLLM's LoRA kernels take plain low-rank adapters); use rollout.generator=hf for "
            f"{peft.method.value}",
            ("peft.method",),
        )
    if peft.method is PeftMethod.LORA and peft.modules_to_save:
        return (
            f"peft.modules_to_save={peft.modules_to_save}: rollout.generator=vllm loads "
            "low-rank adapters only; use rollout.generator=hf",
            ("peft.modules_to_save",),
        )
    if peft.adapters:
        return (
            "peft.adapters: rollout.generator=vllm serves one adapter; use rollout.generator=hf",
            ("peft.adapters",),
        )
    if beta > 0:
        return (
            f"grpo.beta={beta}: rollout.generator=vllm computes no reference logprobs yet (the "
            "KL term needs them); set grpo.beta=0 or use rollout.generator=hf",
            ("grpo.beta",),
        )
    return None
