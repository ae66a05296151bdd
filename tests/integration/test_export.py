"""`dist-ft export` and `dist-ft merge` round trips, and a rollout worker's adapter hot-swap.

A "run" here is the real output layout (``prepare_output_dir``'s ``config.yaml``, the final
weights by ``save_artefact``, which ``Learner.save_pretrained`` calls) with the trainable
tensors moved by a seeded draw in place of training steps: the export sees what a run leaves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_ft.cli import main
from dist_ft.config import load_config
from dist_ft.models import PeftSpec, load_policy, resolve_model_path
from dist_ft.peft_methods import save_artefact
from dist_ft.sync import fingerprint
from dist_ft.trainer import prepare_output_dir

LORA_FILE = "adapter_model.safetensors"
LAYER = "base_model.model.model.layers.0.self_attn.q_proj"  # one LoRA layer, peft's key


def make_run(out: Path, *overrides: str, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A finished run's directory, and its policy (base + trained set) for reference logits."""
    cfg = load_config(None, ["run.wandb=disabled", "peft.r=4", f"run.output_dir={out}", *overrides])
    run = prepare_output_dir(cfg)
    base = resolve_model_path(cfg.model.path, cfg.model.tiny)
    policy = load_policy(base, cfg.model.dtype, cfg.peft, torch.device("cpu")).eval()
    # Stand-in for training: every trainable tensor moves (LoRA's B, BitFit's added biases and
    # the bottleneck's up projection start at 0, so the policy differs from the base after)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    final = "model" if cfg.peft.method.value == "none" else "adapter"
    save_artefact(policy, run / final, cfg.peft)
    return run, policy


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:  # the tiny vocabulary has 103 tokens
    return torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))  # [B, T]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_path) -> tuple[Path, torch.nn.Module]:
    return make_run(tmp_path_factory.mktemp("lora"), seed=1)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits  # [B, T, V]


def test_merged_model_loads_without_dist_ft_and_matches(lora_run, ids, tmp_path):
    run, policy = lora_run
    out = tmp_path / "merged"
    subprocess.run(
        [sys.executable, "-m", "dist_ft.cli", "export", str(run), "--merge", str(out)],
        check=True,
        capture_output=True,
    )
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    torch.save(ids, tmp_path / "ids.pt")
    plain = (  # a user's script: transformers alone
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(m(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])\n"
        "assert not [k for k in sys.modules if k.startswith(('dist_ft', 'peft'))]\n"
    )
    args = [str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")]
    subprocess.run([sys.executable, "-c", plain, *args], check=True, cwd=tmp_path)
    got = torch.load(tmp_path / "logits.pt")
    expected = logits(policy, ids)
    assert torch.allclose(got, expected, atol=1e-5)


def test_merge_differs_from_base(lora_run, ids, tiny_path):
    # the round trip above would pass vacuously if the "trained" adapter did nothing
    from transformers import AutoModelForCausalLM

    _, policy = lora_run
    base = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    assert not torch.allclose(logits(base, ids), logits(policy, ids), atol=1e-3)


def test_adapter_export_loads_in_peft(lora_run, ids, tiny_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, policy = lora_run
    assert main(["export", str(run), "--adapter", str(tmp_path / "a")]) == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    assert torch.allclose(logits(loaded, ids), logits(policy, ids), atol=1e-5)


def test_merge_two_adapters_by_peft_semantics(lora_run, tmp_path):
    run_a, _ = lora_run
    run_b, _ = make_run(tmp_path / "b", seed=2)
    a, b = (load_file(str(r / "adapter" / LORA_FILE)) for r in (run_a, run_b))
    s = 32 / 4  # peft.alpha / peft.r of both inputs

    # linear: A and B each combined with sqrt(w * s) (peft 0.21), the result's scaling 1
    out = tmp_path / "linear"
    argv = ["merge", str(run_a), str(run_b / "adapter"), "--weights", "0.5,0.5", str(out)]
    assert main(argv) == 0
    m = load_file(str(out / LORA_FILE))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4
    k = (0.5 * s) ** 0.5
    for part in ("lora_A", "lora_B"):
        key = f"{LAYER}.{part}.weight"
        assert torch.allclose(m[key], k * a[key] + k * b[key], atol=1e-6)

    # cat: rank 8, and its delta-W is exactly the weighted sum of the inputs' delta-Ws
    out = tmp_path / "cat"
    argv = ["merge", str(run_a), str(run_b), "--weights", "0.5,0.5", "--method", "cat", str(out)]
    assert main(argv) == 0
    m = load_file(str(out / LORA_FILE))
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 8

    def delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t[f"{LAYER}.lora_B.weight"] @ t[f"{LAYER}.lora_A.weight"]  # [out, in]

    assert torch.allclose(delta(m), 0.5 * s * delta(a) + 0.5 * s * delta(b), atol=1e-6)


def test_merge_refuses_unequal_ranks_for_linear(lora_run, tmp_path, capsys):
    run_b, _ = make_run(tmp_path / "b", "peft.r=2", seed=2)
    capsys.readouterr()  # the model loads' progress bars
    code = main(["merge", str(lora_run[0]), str(run_b), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "r=[4, 2]" in err


def test_bitfit_merges_into_bias_flags(tmp_path, ids):
    from transformers import AutoModelForCausalLM

    run, policy = make_run(tmp_path / "run", "peft.method=bitfit")
    assert main(["export", str(run), "--merge", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    assert merged.config.attention_bias and merged.config.mlp_bias
    assert torch.allclose(logits(merged, ids), logits(policy, ids), atol=1e-5)


def test_full_fine_tuning_exports_the_model(tmp_path, ids):
    from transformers import AutoModelForCausalLM

    run, policy = make_run(tmp_path / "run", "peft.method=none")
    assert main(["export", str(run), "--merge", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    assert torch.allclose(logits(merged, ids), logits(policy, ids), atol=1e-5)


def test_bottleneck_adapter_merge_is_refused_in_one_line(tmp_path, capsys):
    run, _ = make_run(tmp_path / "run", "peft.method=adapter")
    capsys.readouterr()  # the model loads' progress bars
    code = main(["export", str(run), "--merge", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "peft.method=adapter" in err
    assert not (tmp_path / "m").exists()
    # the adapter alone still exports, in dist_ft's format
    assert main(["export", str(run), "--adapter", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "dist_ft_adapter.safetensors").is_file()


def test_hot_swap_keeps_the_base_and_loads_the_new_adapter(lora_run, tmp_path, tiny_path, ids):
    from dist_ft.models import PeftMethod
    from dist_ft.rollout.base import GeneratorSpec
    from dist_ft.rollout.hf import HFGenerator

    run_a, _ = lora_run
    run_b, policy_b = make_run(tmp_path / "b", seed=3)
    spec = GeneratorSpec(
        model_path=tiny_path,
        dtype="float32",
        peft=PeftSpec(method=PeftMethod.LORA, r=4),
        device="cpu",
        max_new_tokens=4,
        temperature=1.0,
        top_p=1.0,
        need_ref_logprobs=False,
    )
    gen = HFGenerator(spec)
    base = {n: p for n, p in gen.model.named_parameters() if "lora_" not in n}
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in base.items()}
    for run in (run_a, run_b):  # A in, then swapped for B
        tensors = load_file(str(run / "adapter" / LORA_FILE))
        gen.load_weights(tensors)
        assert fingerprint(gen.export_weights()) == fingerprint(tensors)
        for n, p in gen.model.named_parameters():
            if n in base:
                assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n
    assert torch.allclose(logits(gen.model, ids), logits(policy_b, ids), atol=1e-6)
