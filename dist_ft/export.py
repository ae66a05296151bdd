"""``dist-ft export`` and ``dist-ft merge``: a finished run's weights as a plain HF model or a
standalone adapter, and several LoRA adapters combined into one.

What ``export --merge`` does per ``peft.method`` (the run's ``config.yaml`` says which):

=====================  ===================================================================
lora, lora_fa, dora,   peft's ``merge_and_unload`` into the base loaded in ``model.dtype``
vera, ia3              (QLoRA: into the *unquantised* base, the usual way to ship a QLoRA
qlora                  result; its logits differ from the nf4 training policy's by the
                       quantisation error)
bitfit                 the trained biases written into the base, with the HF config flags
                       that give those layers a bias (Llama's ``attention_bias`` and
                       ``mlp_bias``); refused where no flag of the architecture covers a
                       trained bias (e.g. Qwen2's ``o_proj``)
none (full)            the saved ``model/`` re-saved as safetensors, with the tokenizer
prefix, adapter        refused: prefixes and bottleneck layers have no place in the plain
                       architecture (``--adapter`` still writes them)
=====================  ===================================================================

``merge`` is peft's ``add_weighted_adapter`` (LoRA; (IA)^3 ``linear`` only). Its semantics,
peft 0.21, per targeted layer with scaling ``s_i = alpha_i / r_i``:

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: A and B are
  combined *separately* (``A = sum_i sqrt(w_i s_i) A_i``, the same for B; ties/dare/prune
  first sparsify each A_i, B_i at ``density``), all inputs need the same ``r``, and the result
  has ``r`` and ``alpha = r``. ``B A`` therefore has cross terms: it is not ``sum_i w_i dW_i``
  (peft calls ``linear`` "a very rough approximation").
- ``cat``: A and B stacked, rank ``sum r_i``: ``dW = sum_i w_i dW_i`` exactly.
- ``svd`` (and the ``*_svd`` variants): ``sum_i w_i dW_i`` (or its ties/dare/prune form),
  truncated to the largest input rank by SVD.

DoRA is refused (peft combines A and B but not the magnitude vectors), as are dist_ft's own
bitfit/adapter artefacts. DARE's random drop is seeded (``seed``) so a merge is reproducible.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_ft.models import DTYPES, PeftMethod, resolve_model_path
from dist_ft.peft_methods import CONFIG_FILE, WEIGHTS_FILE

# add_weighted_adapter's combination types (peft 0.21, LoRA); those that prune need a density
COMBINATIONS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
_PRUNING = {c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude"))}
_SAME_RANK = {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
_UNMERGEABLE = {PeftMethod.PREFIX: "prefix", PeftMethod.ADAPTER: "bottleneck adapter"}
# HF config flags that give a family of linear layers a bias (Llama, Mistral-likes, OLMo, ...)
_BIAS_FLAGS = ("attention_bias", "mlp_bias")


class ExportError(ValueError):
    """An export or merge dist_ft refuses, or a run directory that lacks what it needs."""


def finished_run(run_dir: str | Path, name: str | None = None) -> tuple[Any, Path]:
    """A finished run's resolved config (``Config``) and its final weights: ``adapter/`` under
    PEFT, ``model/`` for full fine-tuning; ``adapter/<name>/`` of a run with several
    (``peft.adapters``), which must name one."""
    from dist_ft.config import load_config
    from dist_ft.runstatus import unfinished

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ExportError(f"{run} is not a run directory: it has no config.yaml")
    cfg = load_config(run / "config.yaml")
    weights = run / ("model" if cfg.peft.method is PeftMethod.NONE else "adapter")
    if why := unfinished(run):
        kept = sorted(p.name for p in run.glob(f"{weights.name}-interrupted-step-*"))
        raise ExportError(
            f"{run} {why}: only a finished run is exported; continue it with run.resume=auto"
            + (f" (the weights it kept: {', '.join(kept)})" if kept else "")
        )
    if not weights.is_dir():
        raise ExportError(
            f"{run} has no {weights.name}/ (a run saves it when it finishes; an interrupted "
            f"one leaves {weights.name}-interrupted-step-N/ to copy into its place)"
        )
    names = list(cfg.peft.adapters)
    if names and name not in names:
        raise ExportError(
            f"{run} trained adapters {names} (peft.adapters): name one with --name"
            + ("" if name is None else f" ({name!r} is not one of them)")
        )
    if name is not None and not names:
        raise ExportError(f"--name {name}: {run} trained one adapter, not peft.adapters")
    return cfg, weights / name if names else weights


def export_run(
    run_dir: str | Path,
    merge_to: str | Path | None = None,
    adapter_to: str | Path | None = None,
    name: str | None = None,
) -> dict[str, str]:
    """Write a finished run's result: ``merge_to`` a plain HF model (safetensors + tokenizer)
    with the adapter merged in, ``adapter_to`` the adapter files alone; ``name``: which of a
    ``peft.adapters`` run's. Returns what was written, ``{"merged": dir, "adapter": dir}``."""
    cfg, weights = finished_run(run_dir, name)
    method = cfg.peft.method
    if merge_to is None and adapter_to is None:
        raise ExportError("nothing to export: give --merge OUT and/or --adapter OUT")
    if adapter_to is not None and method is PeftMethod.NONE:
        raise ExportError("peft.method=none (full fine-tuning) has no adapter: use --merge")
    if merge_to is not None and method in _UNMERGEABLE:
        raise ExportError(
            f"peft.method={method.value}: a {_UNMERGEABLE[method]} has no place in the plain HF "
            "architecture of the base model, so it cannot be merged; export it with --adapter"
        )
    written: dict[str, str] = {}
    if adapter_to is not None:
        out = Path(adapter_to)
        out.mkdir(parents=True, exist_ok=True)
        for f in weights.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
        written["adapter"] = str(out)
    if merge_to is not None:
        base = resolve_model_path(cfg.model.path, cfg.model.tiny)
        dtype, remote = DTYPES[cfg.model.dtype], cfg.model.trust_remote_code
        if method is PeftMethod.NONE:
            model = _load(str(weights), dtype, remote)
        elif method is PeftMethod.BITFIT:
            model = _bitfit_merged(base, weights, dtype, remote)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(_load(base, dtype, remote), str(weights))
            model = model.merge_and_unload()
        _save_model(model, base, Path(merge_to), remote)
        written["merged"] = str(merge_to)
    return written


def _load(path: str, dtype: torch.dtype | str, remote: bool, config: Any = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"dtype": dtype, "trust_remote_code": remote}
    if config is not None:
        kw["config"] = config
    return AutoModelForCausalLM.from_pretrained(path, **kw)


def _save_model(model: nn.Module, base: str, out: Path, remote: bool) -> None:
    from transformers import AutoTokenizer

    model.save_pretrained(str(out), safe_serialization=True)
    # the base's tokenizer as it is, not load_tokenizer's (left padding is a rollout setting)
    AutoTokenizer.from_pretrained(base, trust_remote_code=remote).save_pretrained(str(out))


def _bitfit_merged(base: str, weights: Path, dtype: torch.dtype, remote: bool) -> nn.Module:
    """The base with the trained biases in place: the config flags that create exactly the
    bias parameters bitfit added (and, for a flag covering more layers, zero biases in the
    others, which change nothing)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    biases = load_file(str(weights / WEIGHTS_FILE))
    config = AutoConfig.from_pretrained(base, trust_remote_code=remote)

    def names(cfg: Any) -> set[str]:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=remote)
        return {n for n, _ in model.named_parameters()}

    have = names(config)
    needed = set(biases) - have
    for flag in _BIAS_FLAGS:
        if needed and getattr(config, flag, None) is False:
            setattr(config, flag, True)
            added = names(config) - have
            if added & needed:
                needed -= added
                have |= added
            else:
                setattr(config, flag, False)
    if needed:
        raise ExportError(
            f"peft.method=bitfit trained biases that {type(config).__name__} cannot hold (no "
            f"config flag among {list(_BIAS_FLAGS)} adds them): {sorted(needed)[:3]}; export "
            "the biases with --adapter instead, or train bitfit with peft.target_modules "
            "naming only layers the architecture can give a bias"
        )
    model = _load(base, dtype, remote, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in biases:
                p.copy_(biases[name])
            elif name.rsplit(".", 1)[-1] == "bias":
                # a flag's bias that bitfit did not have (it trains every bias the policy has):
                # from_pretrained initialised it, the trained policy adds nothing there
                p.zero_()
    return model


def merge_adapters(
    sources: list[str | Path],
    weights: list[float],
    out: str | Path,
    method: str = "linear",
    density: float | None = None,
    seed: int = 0,
) -> str:
    """Combine the LoRA adapters in ``sources`` (adapter directories, or run directories with
    an ``adapter/``) with ``weights`` into one adapter saved at ``out`` (peft's format), by
    peft's ``add_weighted_adapter(combination_type=method)``; see the module docstring for what
    each method computes. Returns ``out``."""
    if len(sources) < 2:
        raise ExportError(f"merge needs at least two adapters, got {len(sources)}")
    if len(weights) != len(sources):
        raise ExportError(f"--weights has {len(weights)} values for {len(sources)} adapters")
    if method not in COMBINATIONS:
        raise ExportError(f"--method={method}: peft 0.21 combines LoRA by one of {COMBINATIONS}")
    if method in _PRUNING and density is None:
        raise ExportError(f"--method={method} prunes each adapter: give --density in (0, 1]")
    if density is not None and not 0 < density <= 1:
        raise ExportError(f"--density={density} must be in (0, 1]")
    dirs = [_adapter_dir(Path(s)) for s in sources]
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in dirs]
    kinds = {c.get("peft_type") for c in configs}
    if len(kinds) > 1:
        raise ExportError(f"cannot merge adapters of different kinds: {sorted(map(str, kinds))}")
    kind = kinds.pop()
    if kind not in ("LORA", "IA3"):
        raise ExportError(f"peft's weighted merge takes LoRA and (IA)^3 adapters, not {kind}")
    if kind == "IA3" and method != "linear":
        raise ExportError(f"(IA)^3 adapters merge by --method=linear only, not {method}")
    if any(c.get("use_dora") for c in configs):
        raise ExportError(
            "peft.method=dora: peft's weighted merge combines A and B but not DoRA's magnitude "
            "vectors, so the result would not be a DoRA adapter of either input"
        )
    ranks = [max([c.get("r", 0), *(c.get("rank_pattern") or {}).values()]) for c in configs]
    if kind == "LORA" and method in _SAME_RANK and len(set(ranks)) > 1:
        raise ExportError(
            f"--method={method} needs adapters of one rank (peft combines A and B entrywise), "
            f"got r={ranks}: use --method=cat or svd"
        )
    bases = {c.get("base_model_name_or_path") for c in configs}
    if len(bases) > 1:
        raise ExportError(f"the adapters have different bases: {sorted(map(str, bases))}")
    base = bases.pop()
    if not base or not Path(base).is_dir():
        raise ExportError(
            f"{dirs[0]}/adapter_config.json names base_model_name_or_path={base!r}, not a local "
            "model directory (dist_ft never downloads): edit it to the base model's directory"
        )
    from peft import PeftModel

    names = [f"a{i}" for i in range(len(dirs))]
    model = PeftModel.from_pretrained(_load(base, "auto", False), str(dirs[0]), adapter_name="a0")
    for name, d in zip(names[1:], dirs[1:], strict=True):
        model.load_adapter(str(d), adapter_name=name)
    kw: dict[str, Any] = {}
    if kind == "LORA":
        kw = {"combination_type": method, "density": density}
    torch.manual_seed(seed)  # DARE's random drop
    # "default" is the name peft saves at the top of ``out`` rather than in a subfolder
    try:
        model.add_weighted_adapter(names, list(weights), "default", **kw)
    except ValueError as e:  # e.g. unequal ranks under linear/ties/dare
        raise ExportError(f"peft refused --method={method}: {e}") from None
    model.save_pretrained(str(out), selected_adapters=["default"])
    return str(out)


def _adapter_dir(path: Path) -> Path:
    """An adapter directory: ``path`` itself or a run's ``path/adapter``."""
    for d in (path, path / "adapter"):
        if (d / "adapter_config.json").is_file():
            return d
        if (d / CONFIG_FILE).is_file():
            method = json.loads((d / CONFIG_FILE).read_text())["peft"]["method"]
            raise ExportError(
                f"{d} holds a peft.method={method} artefact (dist_ft's format); peft's weighted "
                "merge takes LoRA and (IA)^3 adapters only"
            )
    raise ExportError(f"{path} is neither an adapter directory nor a run with an adapter/")
