"""A deterministic tiny causal LM and character-level tokenizer, built locally (no hub, ever).

Both are written in HF format, so tests and the demo load them through the same
``from_pretrained(local_dir)`` path as a real model. The build is a pure function of the shape
and seed, so every process (and every node) that asks for it gets bit-identical weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
# Printable ASCII less the vertical whitespace, plus newline: ~100 symbols, one token each.
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character is its own token; Fuse joins them back without separators.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(
    vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, seed: int
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        pad_token_id=SPECIAL.index("<pad>"),
        bos_token_id=SPECIAL.index("<s>"),
        eos_token_id=SPECIAL.index("</s>"),
        tie_word_embeddings=True,
        # Wider than Llama's 0.02: with a 64-wide residual, 0.02 caps every logit near +-1.3
        # after RMSNorm, so an adapter that cannot touch lm_head could never become confident.
        initializer_range=0.2,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:  # building the model must not disturb the caller's RNG stream
        torch.random.set_rng_state(generator_state)
    return model


def cache_dir() -> Path:
    return Path(os.environ.get("DIST_FT_CACHE", Path.home() / ".cache" / "dist_ft"))


def ensure_tiny_model(
    hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0
) -> Path:
    """Return a local HF directory holding the tiny model and tokenizer, building it once."""
    spec = {"h": hidden_size, "l": num_layers, "a": num_heads, "s": seed, "v": 4}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / f"tiny-llama-{key}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp dir and rename: concurrent processes (Ray actors) never see a half model.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        tokenizer = build_tokenizer()
        model = build_model(len(tokenizer), hidden_size, num_layers, num_heads, seed)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # If another process won the race, its copy is identical: keep it.
        with contextlib.suppress(OSError):
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
