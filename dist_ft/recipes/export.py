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

What every export and merge checks before it loads a model: the inputs' ``MANIFEST.json``
(sha256 of each file, written by :func:`seal` where a run saves its final weights), that every
tensor parses, is finite and within ``MAX_ABS_WEIGHT``, and that OUT is no input, holds no
input and is empty (``overwrite`` replaces an earlier export). OUT is written to a temporary
sibling and renamed into place, sealed: it is never half-written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_ft.model.loading import DTYPES, resolve_model_path
from dist_ft.model.spec import (
    CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    WEIGHTS_FILE,
    HFModel,
    PeftMethod,
)
from dist_ft.run.artefacts import (
    MANIFEST,
    ExportError,
    check_sealed,
    check_tensors,
    check_weights,
    finished_run,
    seal,
)

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
# The files by which --overwrite knows an earlier export's directory (it deletes nothing else)
_EXPORTED = (MANIFEST, "config.json", "adapter_config.json", CONFIG_FILE)


def check_out(out: Path, overwrite: bool, inputs: Iterable[Path], what: str) -> None:
    """Refuse an OUT that is or lies in an input, that holds an input, that is a file, or that
    is not empty (``overwrite``: unless it is an earlier export, which it then replaces)."""
    target = out.resolve()
    for i in inputs:
        src = i.resolve()
        if target == src or src in target.parents:
            raise ExportError(
                f"{what} {out} is inside the input {i}: an export never writes into what it "
                "reads; give a directory outside it"
            )
        if target in src.parents:
            raise ExportError(f"{what} {out} holds the input {i}: give a directory outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{what} {out} is a file, not a directory: give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(
                f"{what} {out} already exists and is not empty: pass --overwrite to replace it, "
                "or give a new directory"
            )
        if not any((out / n).exists() for n in _EXPORTED):
            raise ExportError(
                f"{what} {out} holds files that are not an exported model or adapter (no "
                f"{' or '.join(_EXPORTED)}): --overwrite replaces only an earlier export; "
                "remove it yourself or give a new directory"
            )


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``out`` to write into; once written it is sealed and
    replaces ``out`` (check_out allowed that), and on failure it is removed: a reader never
    sees a half-written OUT."""
    out = out.resolve()
    tmp = out.with_name(f".{out.name}.partial")
    try:
        if tmp.exists():  # left by an export that died mid-write
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:  # a read-only filesystem, a file where a folder must be...
        raise ExportError(f"cannot write {out}: {e.strerror} ({e.filename})") from None
    try:
        yield tmp
        seal(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def export_run(
    run_dir: str | Path,
    merge_to: str | Path | None = None,
    adapter_to: str | Path | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write a finished run's result: ``merge_to`` a plain HF model (safetensors + tokenizer)
    with the adapter merged in, ``adapter_to`` the adapter files alone with a model card;
    ``name``: which of a ``peft.adapters`` run's; ``overwrite``: replace an earlier export.
    Returns what was written, ``{"merged": dir, "adapter": dir}``."""
    if merge_to is None and adapter_to is None:
        raise ExportError("nothing to export: give --merge OUT and/or --adapter OUT")
    outs = {f: Path(o) for f, o in (("--merge", merge_to), ("--adapter", adapter_to)) if o}
    for flag, out in outs.items():
        check_out(out, overwrite, [Path(run_dir)], flag)
    if len(outs) == 2:
        a, b = (o.resolve() for o in outs.values())
        if a == b or a in b.parents or b in a.parents:
            raise ExportError("--merge and --adapter need two separate directories")
    cfg, weights = finished_run(run_dir, name)
    method = cfg.peft.method
    if adapter_to is not None and method is PeftMethod.NONE:
        raise ExportError("peft.method=none (full fine-tuning) has no adapter: use --merge")
    if merge_to is not None and method in _UNMERGEABLE:
        raise ExportError(
            f"peft.method={method.value}: a {_UNMERGEABLE[method]} has no place in the plain HF "
            "architecture of the base model, so it cannot be merged; export it with --adapter"
        )
    written: dict[str, str] = {}
    base = resolve_model_path(cfg.model.path, cfg.model.tiny)
    if adapter_to is not None:
        with _writing(Path(adapter_to)) as tmp:
            for f in weights.iterdir():
                if f.is_file() and f.name != MANIFEST:
                    shutil.copyfile(f, tmp / f.name)
            _card_for_run(tmp, cfg, Path(run_dir), base)
        written["adapter"] = str(adapter_to)
    if merge_to is not None:
        dtype, remote = DTYPES[cfg.model.dtype], cfg.model.trust_remote_code
        if method is PeftMethod.NONE:
            model = _load(str(weights), dtype, remote)
        elif method is PeftMethod.BITFIT:
            model = _bitfit_merged(base, weights, dtype, remote)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(_load(base, dtype, remote), str(weights))
            model = model.merge_and_unload()
        # base + delta can leave fp16's range though each factor of the delta is within it
        check_tensors(model.state_dict().items(), f"{run_dir} merged into its base")
        with _writing(Path(merge_to)) as tmp:
            _save_model(model, base, tmp, remote)
        written["merged"] = str(merge_to)
    return written


def _name_base(adapter: Path, base: str) -> str:
    """An exported adapter names its base by the base directory's name, not a path into this
    machine's cache (the model card says which base that is). Returns the name."""
    name = Path(base).name
    for file, key in (
        ("adapter_config.json", "base_model_name_or_path"),
        (CONFIG_FILE, "base_model"),
    ):
        if (adapter / file).is_file():
            meta = json.loads((adapter / file).read_text())
            meta[key] = name
            (adapter / file).write_text(json.dumps(meta, indent=2) + "\n")
    return name


def _write_card(adapter: Path, title: str, base: str, origin: str, about: str) -> None:
    """The adapter's model card (README.md, in place of peft's empty template): which base it
    needs (``base``, described by ``origin``), how it was made (``about``), how to load it."""
    if (adapter / PEFT_WEIGHTS_FILE).is_file():
        load = (
            "```python\nfrom peft import PeftModel\nfrom transformers import "
            'AutoModelForCausalLM\n\nbase = AutoModelForCausalLM.from_pretrained("BASE_DIR")'
            '\nmodel = PeftModel.from_pretrained(base, "THIS_DIR")\n```'
        )
    else:
        load = (
            f"`{WEIGHTS_FILE}` holds the trained tensors under the base's parameter names and "
            f"`{CONFIG_FILE}` the `peft:` settings that rebuild the layers (dist_ft's format: "
            "`dist_ft.model.loading.load_policy(BASE_DIR, dtype, PeftSpec(**peft))`, then "
            "`dist_ft.model.weights.load_artefact(model, THIS_DIR)`)."
        )
    (adapter / "README.md").write_text(
        f"# {title}\n\nBase model: `{base}`, {origin}. The adapter is for that base only.\n\n"
        f"{about} Load it on the base (BASE_DIR: the base's directory):\n\n{load}\n\n"
        f"`{MANIFEST}` lists the sha256 of every file.\n"
    )


def _card_for_run(adapter: Path, cfg: Any, run: Path, base: str) -> None:
    """An exported run's adapter named and carded: its base, objective and steps."""
    name = _name_base(adapter, base)
    if cfg.model.path == "tiny":
        t = cfg.model.tiny
        origin = (
            f"dist_ft's built-in tiny Llama (model.tiny: hidden_size={t.hidden_size}, "
            f"num_layers={t.num_layers}, num_heads={t.num_heads}, seed={t.seed}), which dist_ft "
            "builds from these settings (`dist_ft.model.tiny.ensure_tiny_model`)"
        )
    else:
        origin = f"the local model directory `{name}` (the run's model.path: {cfg.model.path})"
    about = (
        f"Objective: {cfg.algo.objective}, {cfg.run.steps} steps; the run's full settings are "
        "in its `config.yaml`."
    )
    title = f"{run.resolve().name}: a {cfg.peft.method.value} adapter trained by dist_ft"
    _write_card(adapter, title, name, origin, about)


def _load(path: str, dtype: torch.dtype | str, remote: bool, config: Any = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"dtype": dtype, "trust_remote_code": remote}
    if config is not None:
        kw["config"] = config
    return AutoModelForCausalLM.from_pretrained(path, **kw)


def _save_model(model: HFModel, base: str, out: Path, remote: bool) -> None:
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
    overwrite: bool = False,
) -> str:
    """Combine the LoRA adapters in ``sources`` (adapter directories, or run directories with
    an ``adapter/``) with ``weights`` into one adapter saved at ``out`` (peft's format), by
    peft's ``add_weighted_adapter(combination_type=method)``; see the module docstring for what
    each method computes. ``overwrite``: replace an earlier export at ``out``. Returns ``out``."""
    if len(sources) < 2:
        raise ExportError(f"merge needs at least two adapters, got {len(sources)}")
    if len(weights) != len(sources):
        raise ExportError(f"--weights has {len(weights)} values for {len(sources)} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise ExportError(f"--weights={','.join(map(str, weights))}: every weight must be finite")
    if method not in COMBINATIONS:
        raise ExportError(f"--method={method}: peft 0.21 combines LoRA by one of {COMBINATIONS}")
    if method in _PRUNING and density is None:
        raise ExportError(f"--method={method} prunes each adapter: give --density in (0, 1]")
    if density is not None and not 0 < density <= 1:
        raise ExportError(f"--density={density} must be in (0, 1]")
    dirs = [_adapter_dir(Path(s)) for s in sources]
    check_out(Path(out), overwrite, [*map(Path, sources), *dirs], "OUT")
    for d in dirs:
        # a run's adapter/<name>/ is sealed by its parent adapter/'s manifest
        sealed = next((p for p in (d, d.parent) if (p / MANIFEST).is_file()), None)
        if sealed is not None:
            check_sealed(sealed)
        check_weights(d)
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
            "model directory (dist_ft never downloads; an exported adapter names its base by "
            "name): edit it to the base model's directory, or merge the runs' own adapter/"
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
    from peft import get_peft_model_state_dict

    merged = get_peft_model_state_dict(model, adapter_name="default")
    check_tensors(merged.items(), f"the merge of {', '.join(map(str, sources))}")
    with _writing(Path(out)) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=["default"])
        name = _name_base(tmp, base)
        inputs = ", ".join(f"`{s}` x {w:g}" for s, w in zip(sources, weights, strict=True))
        about = (
            f"Made by `dist-ft merge --method {method}`"
            + (f" (density {density:g})" if density is not None else "")
            + f" of {inputs} (peft's `add_weighted_adapter`)."
        )
        origin = f"the local model directory `{name}` its inputs were trained on"
        _write_card(tmp, f"{Path(out).name}: merged adapters", name, origin, about)
    return str(out)


def _adapter_dir(path: Path) -> Path:
    """An adapter directory: ``path`` itself or a run's ``path/adapter`` (a finished run's:
    an unfinished one's adapter/ is not the one it would have saved)."""
    from dist_ft.run.runstatus import unfinished

    for d in (path, path / "adapter"):
        if (d / "adapter_config.json").is_file():
            if d != path and (why := unfinished(path)):
                raise ExportError(f"{path} {why}: only a finished run's adapter is merged")
            return d
        if (d / CONFIG_FILE).is_file():
            method = json.loads((d / CONFIG_FILE).read_text())["peft"]["method"]
            raise ExportError(
                f"{d} holds a peft.method={method} artefact (dist_ft's format); peft's weighted "
                "merge takes LoRA and (IA)^3 adapters only"
            )
    raise ExportError(f"{path} is neither an adapter directory nor a run with an adapter/")
