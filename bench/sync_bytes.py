"""Bytes per weight sync, LoRA adapter vs full weights, for the tiny model and for 0.5B- and
7B-shaped models (Qwen2.5 dimensions, built on the meta device: no weights, no download).

The tiny model's LoRA figure is also measured from a real learner export, so the estimate and
what `sync_weights` actually sends are checked against each other.

    python bench/sync_bytes.py
"""

from __future__ import annotations

from transformers import AutoConfig, Qwen2Config

from dist_ft.config import TinyModelConfig
from dist_ft.model.loading import resolve_model_path
from dist_ft.model.spec import PeftMethod, PeftSpec
from dist_ft.model.weights import sync_bytes

SHAPES = {
    "0.5B (Qwen2.5-0.5B dims)": Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "7B (Qwen2.5-7B dims)": Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}


def measured_tiny_adapter_bytes(path: str) -> int:
    """What a real sync sends: the learner's export of the tiny model's adapter."""
    from dist_ft.algos.settings import LossParams
    from dist_ft.learner import Learner, LearnerSpec

    spec = LearnerSpec(
        model_path=path,
        dtype="float32",
        peft=PeftSpec(),
        device="cpu",
        loss=LossParams(),
        temperature=1.0,
        lr=1e-3,
        weight_decay=0.0,
        grad_clip=1.0,
        zero_stage=0,
        offload="none",
        samples_per_step=8,
        micro_batches=1,
        seed=0,
    )
    learner = Learner(spec)
    return sum(t.nbytes for t in learner.export_weights().values())


def main() -> None:
    lora = PeftSpec(method=PeftMethod.LORA, r=16, alpha=32)
    tiny_path = resolve_model_path("tiny", TinyModelConfig())
    rows = [("tiny (fp32)", sync_bytes(AutoConfig.from_pretrained(tiny_path), lora, "float32"))]
    rows += [(f"{name} (bf16)", sync_bytes(c, lora, "bfloat16")) for name, c in SHAPES.items()]
    print(f"LoRA r={lora.r} on all linear layers; bytes per weight sync")
    print(f"{'model':34} {'full':>15} {'LoRA adapter':>13} {'ratio':>8}")
    for name, b in rows:
        print(f"{name:34} {b['full']:>15,} {b['adapter']:>13,} {b['full'] / b['adapter']:>7.1f}x")
    measured = measured_tiny_adapter_bytes(tiny_path)
    print(
        f"tiny adapter measured from a real learner export: {measured:,} bytes "
        f"({'matches' if measured == rows[0][1]['adapter'] else 'DIFFERS FROM'} the estimate)"
    )


if __name__ == "__main__":
    main()
