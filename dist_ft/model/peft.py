"""The ``peft.method`` zoo: one builder per method, each turning a loaded base model into the
policy with a named set of trainable parameters.

Learners and rollout workers both build through :func:`apply_method` (via
``model.loading.load_policy``), so the trainable set, its names and the reference path agree by
construction. What each method trains, syncs and uses as its KL reference:

============  =====================================  =======================================
method        trains (and syncs)                     reference logprobs (``grpo.beta > 0``)
============  =====================================  =======================================
none          every weight                           a frozen copy of the start (rollout/hf)
lora, dora    peft's ``lora_A``/``lora_B`` (+ DoRA   peft's ``disable_adapter``
              magnitude)
qlora         LoRA over a 4-bit nf4 base             peft's ``disable_adapter``
lora_fa       ``lora_B`` only (``lora_A`` frozen,    peft's ``disable_adapter``
              drawn from a fixed seed everywhere)
vera          per-layer ``vera_lambda_b/d``          peft's ``disable_adapter``
ia3           per-layer ``ia3_l`` scales             peft's ``disable_adapter``
prefix        ``prompt_encoder`` (synced as          peft's ``disable_adapter``: the base
              peft's ``prompt_embeddings``)          *without* the prefix, which (random
                                                     at init) the start already differs from
bitfit        biases                                 the starting biases swapped in
adapter       bottleneck ``down``/``up`` layers      the bottleneck layers switched off
============  =====================================  =======================================

Every method trains under ZeRO-0, 2 and 3 (``tests/integration/test_peft_methods.py`` checks
that 2 and 3 reach ZeRO-0's weights), QLoRA included; none is refused by stage. Every method
but prefix starts as the base model exactly (LoRA's B, VeRA's lambda_b, the adapters' up
projection and BitFit's added biases start at 0; (IA)^3's scales at 1).

peft has LoRA-FA only as an optimizer (``peft.optimizers.create_lorafa_optimizer``), which
DeepSpeed's ZeRO optimizer cannot take; here it is LoRA with ``lora_A`` frozen at its random
init and ``lora_B`` trained by the run's AdamW: the paper's frozen projection without its
gradient-projection optimizer. peft has neither BitFit nor bottleneck adapters; both are built
here and carried in dist_ft's own format (see :func:`save_artefact`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from dist_ft.model.spec import TRAINABLE_SET, HFModel, PeftMethod, PeftSpec

# On a bitfit policy: {bias name: its value at load}, what the reference swaps back in.
START_BIASES = "dist_ft_start_biases"

LORA_FA_SEED = 0  # lora_fa's frozen A, the same on every process


# Decoder sub-blocks a bottleneck adapter follows, by the attribute name architectures use.
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


# ---------------------------------------------------------------------------- builders


def _lora(model: nn.Module, spec: PeftSpec) -> nn.Module:
    """LoRA, DoRA (``use_dora``) and QLoRA (LoRA over the 4-bit base ``load_policy`` loaded)."""
    from peft import get_peft_model

    names = list(spec.adapters) or ["default"]
    peft_model = get_peft_model(model, lora_config(spec), adapter_name=names[0])
    for name in names[1:]:  # peft.adapters: more adapters on the same base layers
        peft_model.add_adapter(name, lora_config(spec))
    if len(names) > 1:
        use_adapter(peft_model, names[0])
    if spec.method is PeftMethod.QLORA:
        _keep_4bit_trainable(peft_model)
    return peft_model


def use_adapter(model: HFModel, name: str) -> None:
    """Route ``model``'s forward through adapter ``name`` of several (``peft.adapters``).

    peft's ``set_adapter`` also freezes the others; they are made trainable again, so the set
    of parameters that requires grad never changes under DeepSpeed (its ZeRO partitions and
    gradient hooks are built once, at initialize). An adapter off the forward gets no
    gradient, and the learner steps it at learning rate 0 (``Learner.step``).
    """
    model.set_adapter(name)
    for adapter in model.peft_config:
        for p in adapter_parameters(model, adapter):
            p.requires_grad_(True)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Adapter ``name``'s parameters: peft keeps them in per-adapter dicts (``lora_A.<name>``,
    ``lora_magnitude_vector.<name>``, ``modules_to_save.<name>``)."""
    pattern = re.compile(rf"\.(lora_\w+|modules_to_save)\.{re.escape(name)}(\.|$)")
    return [p for n, p in model.named_parameters() if pattern.search(n)]


def by_adapter(model: HFModel, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """A peft sync's tensors split by the adapter they load into. A policy with several
    adapters names its tensors ``"<adapter>/<peft name>"`` (:func:`trainable_state`); one with
    a single adapter sends peft's names alone."""
    if len(model.peft_config) == 1:
        return {next(iter(model.peft_config)): tensors}
    parts: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        adapter, sep, name = key.partition("/")
        if not sep or adapter not in model.peft_config:
            raise KeyError(f"adapter sync tensor {key!r} names no adapter of this policy")
        parts.setdefault(adapter, {})[name] = t
    return parts


def _lora_fa(model: nn.Module, spec: PeftSpec) -> nn.Module:
    # LoRA-FA (Zhang et al. 2023): A stays a fixed random projection, only B trains. B starts
    # at 0, so the policy starts as the base and every step moves B from the first one on.
    # A is drawn from a fixed seed (peft's kaiming-uniform init, as VeRA's projection_prng_key
    # does for its matrices), so every learner and rollout worker holds the same A and a sync
    # carries B alone.
    model = _lora(model, spec)
    generator = torch.Generator().manual_seed(LORA_FA_SEED)
    for name, p in sorted(model.named_parameters()):
        if "lora_A" in name:
            p.requires_grad_(False)
            with torch.no_grad():
                bound = p.shape[1] ** -0.5  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))
                draw = torch.empty(p.shape, dtype=torch.float32).uniform_(
                    -bound, bound, generator=generator
                )
                p.copy_(draw)
    return model


def _vera(model: nn.Module, spec: PeftSpec) -> nn.Module:
    from peft import VeraConfig, get_peft_model

    config = VeraConfig(
        r=spec.r,
        target_modules=spec.target_modules,
        vera_dropout=spec.dropout,
        modules_to_save=list(spec.modules_to_save) or None,
        # The shared random A/B are rebuilt from projection_prng_key on every process, so a
        # sync (and the saved adapter) carries the per-layer vectors only.
        save_projection=False,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _ia3(model: nn.Module, spec: PeftSpec) -> nn.Module:
    from peft import IA3Config, get_peft_model

    # "all-linear" (the default) means peft's per-architecture table: keys, values and the FFN
    # down projection, the paper's placement. A list is passed through as IA3 target modules.
    targets = None if spec.target_modules == "all-linear" else spec.target_modules
    config = IA3Config(
        target_modules=targets,
        modules_to_save=list(spec.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _prefix(model: nn.Module, spec: PeftSpec) -> nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    # No reparametrising MLP (prefix_projection): with it, peft syncs and saves the MLP's
    # output rather than the trainable tensors.
    config = PrefixTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _matches(name: str, targets: str | list[str]) -> bool:
    """peft's target_modules rule: a string is a full-match regex, a list matches a module whose
    name is an entry or ends in ``.entry``. ("all-linear" is handled by the caller.)"""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _bitfit(model: HFModel, spec: PeftSpec) -> nn.Module:
    """BitFit (Ben Zaken et al. 2022): only biases train.

    Most current decoders (Llama, Mistral, Qwen's MLP) have no biases. Rather than refuse
    them, every linear layer that ``target_modules`` names and that lacks a bias gets a zero one,
    so the policy starts exactly as the base: the closest bias-only update such a model has.
    Existing biases anywhere in the model train too.
    """
    model.requires_grad_(False)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.bias is not None:
            continue
        named = (
            module is not head
            if spec.target_modules == "all-linear"
            else _matches(name, spec.target_modules)
        )
        if named:
            w = module.weight
            module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    biases = {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    if not biases:
        raise ValueError(
            f"peft.method=bitfit: {type(model).__name__} has no biases and "
            f"peft.target_modules={spec.target_modules!r} names no linear layer to add them to"
        )
    for p in biases.values():
        p.requires_grad_(True)
    # The reference policy is the start: a copy of the biases (the trainable set's bytes, not
    # a second model) is swapped in by reference_mode().
    setattr(model, START_BIASES, {n: p.detach().clone() for n, p in biases.items()})
    setattr(model, TRAINABLE_SET, PeftMethod.BITFIT.value)
    return model


class Bottleneck(nn.Module):
    """``h + up(gelu(down(h)))`` (Houlsby et al. 2019), width ``peft.r``. ``up`` starts at 0, so
    the policy starts exactly as the base (and ``down`` gets gradient from the second step on,
    as LoRA's A does)."""

    def __init__(self, hidden: int, width: int, like: torch.Tensor) -> None:
        super().__init__()
        kw: dict[str, Any] = {"dtype": like.dtype, "device": like.device}
        self.down = nn.Linear(hidden, width, **kw)
        self.up = nn.Linear(width, hidden, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.enabled = True  # reference_mode() switches it off

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return h
        return h + self.up(nn.functional.gelu(self.down(h)))


def _after_block(module: Any, args: Any, output: Any) -> Any:
    # Any: the block's bottleneck child is set by _adapter, beyond what mypy can see.
    # Attention blocks return (hidden, attn_weights, ...), MLPs the hidden state alone.
    if isinstance(output, tuple):
        return (module.bottleneck(output[0]), *output[1:])
    return module.bottleneck(output)


def _adapter(model: HFModel, spec: PeftSpec) -> nn.Module:
    """Bottleneck adapters after each attention and MLP block (``houlsby``) or after each MLP
    only (``pfeiffer``), on the block's output before the residual add.

    Each adapter is a child named ``bottleneck`` of the block it follows (names like
    ``model.layers.0.mlp.bottleneck.down.weight``), applied by a forward hook, so the base's
    own parameter names are untouched and the trainable set exports and imports by name.
    """
    model.requires_grad_(False)
    names = _MLP_NAMES + (_ATTENTION_NAMES if spec.adapter_style == "houlsby" else ())
    config = model.config.get_text_config() if hasattr(model, "config") else None
    hidden = getattr(config, "hidden_size", None)
    blocks: list[str] = []
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        inside = any(name.startswith(f"{b}.") for b in blocks)
        # a block of a numbered layer: model.layers.0.mlp (Llama), transformer.h.0.mlp (GPT-2)
        numbered = re.search(r"(^|\.)\d+\.[^.]+$", name) is not None
        if last in names and numbered and not inside:
            blocks.append(name)
    if not blocks or hidden is None:
        raise ValueError(
            f"peft.method=adapter: found no blocks named {list(names)} in the numbered layers "
            f"of {type(model).__name__} (or it has no config.hidden_size)"
        )
    like = next(p for p in model.parameters() if p.is_floating_point())
    for name in blocks:
        block = model.get_submodule(name)
        block.bottleneck = Bottleneck(hidden, spec.r, like)
        block.register_forward_hook(_after_block)
    setattr(model, TRAINABLE_SET, PeftMethod.ADAPTER.value)
    return model


BUILDERS: dict[PeftMethod, Callable[[nn.Module, PeftSpec], nn.Module]] = {
    PeftMethod.NONE: lambda model, spec: model,
    PeftMethod.LORA: _lora,
    PeftMethod.DORA: _lora,
    PeftMethod.QLORA: _lora,
    PeftMethod.LORA_FA: _lora_fa,
    PeftMethod.VERA: _vera,
    PeftMethod.IA3: _ia3,
    PeftMethod.PREFIX: _prefix,
    PeftMethod.BITFIT: _bitfit,
    PeftMethod.ADAPTER: _adapter,
}


def apply_method(model: nn.Module, spec: PeftSpec) -> nn.Module:
    """The policy of ``spec.method`` over the loaded base ``model`` (returned as is for none)."""
    return BUILDERS[spec.method](model, spec)


# ---------------------------------------------------------------------------- the trainable set


def is_trainable_set(model: nn.Module) -> bool:
    """Whether dist_ft (not peft) built ``model``'s trainable set (bitfit, adapter)."""
    return getattr(model, TRAINABLE_SET, None) is not None


def trainable_state(
    model: HFModel, adapters: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """What trains, by name (the tensors themselves, not copies): a weight sync's content.
    peft methods: peft's adapter state dict (its names) less any frozen tensor in it (LoRA-FA's
    ``lora_A``); bitfit and adapter: the trainable parameters under their model names.
    A policy with several adapters: ``adapters`` (None: all), each name prefixed with its
    adapter's, ``"<adapter>/<peft name>"``. Under ZeRO-3 the caller gathers first."""
    if not hasattr(model, "peft_config"):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    from peft import get_peft_model_state_dict

    names = list(model.peft_config)
    if len(names) == 1:
        # peft's state-dict names are parameter names without the adapter name
        frozen = {
            n.replace(f".{names[0]}", "")
            for n, p in model.named_parameters()
            if not p.requires_grad
        }
        return {k: v for k, v in get_peft_model_state_dict(model).items() if k not in frozen}
    state = {}
    for adapter in names if adapters is None else adapters:
        part = get_peft_model_state_dict(model, adapter_name=adapter)
        state.update({f"{adapter}/{k}": v for k, v in part.items()})
    return state


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load a dist_ft trainable set; a missing or unexpected name is an error."""
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise KeyError(
            f"peft.method={getattr(model, TRAINABLE_SET)} sync does not match the model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)


@contextlib.contextmanager
def reference_mode(model: HFModel) -> Iterator[None]:
    """The policy acting as the starting model, for reference logprobs, without a second copy:
    peft switches its adapter off, bottleneck adapters switch themselves off, and BitFit (whose
    biases cannot be switched off) swaps its starting biases in and back out. Not for use on a
    ZeRO-3 partitioned model (workers, not learners, compute reference logprobs)."""
    if hasattr(model, "peft_config"):
        # peft re-enables gradients on every adapter tensor when it switches the adapter back
        # on, which would unfreeze LoRA-FA's A (and grow the worker's sync by it)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        try:
            with model.disable_adapter():
                yield
        finally:
            for p in frozen:
                p.requires_grad_(False)
    elif getattr(model, TRAINABLE_SET, None) == PeftMethod.ADAPTER.value:
        adapters = [m for m in model.modules() if isinstance(m, Bottleneck)]
        for m in adapters:
            m.enabled = False
        try:
            yield
        finally:
            for m in adapters:
                m.enabled = True
    elif getattr(model, TRAINABLE_SET, None) == PeftMethod.BITFIT.value:
        params = dict(model.named_parameters())
        start: dict[str, torch.Tensor] = getattr(model, START_BIASES)
        trained = {n: params[n].detach().clone() for n in start}
        with torch.no_grad():
            for n, t in start.items():
                params[n].copy_(t)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, t in trained.items():
                    params[n].copy_(t)
    else:
        raise TypeError(f"{type(model).__name__} has no adapter to switch off (full fine-tuning)")


# ---------------------------------------------------------------------------- saved artefact


# ---------------------------------------------------------------------------- config checks


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


def _keep_4bit_trainable(model: nn.Module) -> None:
    # bitsandbytes on CPUs with AVX512-BF16 repacks 4-bit weights into an inference-only layout
    # on the first eval forward; after that LoRA gets no gradient and no error is raised.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
