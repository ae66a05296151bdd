"""`dist-ft export` and `dist-ft merge` round trips, and a rollout worker's adapter hot-swap.

A "run" here is ``support.make_run``: the real output layout with the trainable tensors moved
by a seeded draw in place of training steps, so the export sees what a run leaves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import corrupt, make_run

from dist_ft.cli import main
from dist_ft.model.spec import PeftSpec
from dist_ft.sync import fingerprint

LORA_FILE = "adapter_model.safetensors"
LAYER = "base_model.model.model.layers.0.self_attn.q_proj"  # one LoRA layer, peft's key


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
    # W + s*B@A summed once reassociates float32 sums: logits of size ~3 moved by 1e-5 on CI's
    # CPU. A wrong merge moves them by more than 1e-3 (test_merge_differs_from_base).
    assert torch.allclose(got, expected, atol=1e-4)


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


def test_merge_two_adapters_by_peft_semantics(lora_run, tiny_path, tmp_path):
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
    # named as export names it, with a card that says what was merged, how
    assert cfg["base_model_name_or_path"] == Path(tiny_path).name
    card = (out / "README.md").read_text()
    assert f"`{run_a}` x 0.5, `{run_b / 'adapter'}` x 0.5" in card and "--method linear" in card
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
    from dist_ft.model.spec import PeftMethod
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


def one_line_error(capsys, code: int) -> str:
    """The refusal's single stderr line (after the model loads' progress bars), exit code 2."""
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("dist-ft: error: "), err
    return err


def test_export_out_is_refused_when_used_and_replaced_with_overwrite(
    lora_run, tiny_path, tmp_path, capsys
):
    from dist_ft.run.artefacts import MANIFEST, check_sealed

    run, _ = lora_run
    out = tmp_path / "a"
    old = os.umask(0o027)
    try:
        assert main(["export", str(run), "--adapter", str(out)]) == 0
    finally:
        os.umask(old)
    # the umask's modes, not safetensors' 0600; a manifest that verifies
    assert (out / LORA_FILE).stat().st_mode & 0o777 == 0o640
    check_sealed(out)
    # the base by its name, and a model card that says which base it needs
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == Path(tiny_path).name
    card = (out / "README.md").read_text()
    assert f"Base model: `{Path(tiny_path).name}`" in card and "PeftModel.from_pretrained" in card

    before = (out / MANIFEST).read_text()
    (out / "note.txt").write_text("mine")
    err = one_line_error(capsys, main(["export", str(run), "--adapter", str(out)]))
    assert err == (
        f"dist-ft: error: --adapter {out} already exists and is not empty: pass --overwrite to "
        "replace it, or give a new directory"
    )
    assert (out / "note.txt").read_text() == "mine" and (out / MANIFEST).read_text() == before
    assert main(["export", str(run), "--adapter", str(out), "--overwrite"]) == 0
    assert not (out / "note.txt").exists()  # replaced whole: nothing of the old OUT mixes in
    check_sealed(out)

    # --overwrite deletes only an earlier export, never a directory of other files
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep")
    err = one_line_error(capsys, main(["export", str(run), "--merge", str(other), "--overwrite"]))
    assert f"--merge {other} holds files that are not an exported model or adapter" in err
    assert (other / "todo.txt").read_text() == "keep"


def test_export_and_merge_never_write_into_their_inputs(lora_run, tmp_path, capsys):
    from dist_ft.run.artefacts import check_sealed

    run_a, _ = lora_run
    run_b, _ = make_run(tmp_path / "b", seed=2)
    capsys.readouterr()
    cases = [
        (
            ["export", str(run_a), "--adapter", str(run_a / "adapter")],
            f"--adapter {run_a / 'adapter'} is inside the input {run_a}",
        ),  # was shutil.SameFileError
        (
            ["export", str(run_a), "--merge", str(run_a)],
            f"--merge {run_a} is inside the input {run_a}",
        ),
        (
            ["merge", str(run_a), str(run_b), str(run_b / "adapter")],
            f"OUT {run_b / 'adapter'} is inside the input {run_b}",
        ),
        (
            ["merge", str(run_a), str(run_b / "adapter"), "--overwrite", str(tmp_path)],
            f"OUT {tmp_path} holds the input {run_b / 'adapter'}",
        ),
    ]
    for argv, message in cases:
        err = one_line_error(capsys, main(argv))
        assert message in err, argv
    for run in (run_a, run_b):
        check_sealed(run / "adapter")  # untouched
        assert sorted(p.name for p in run.iterdir()) == ["adapter", "config.yaml"]


def test_merge_refuses_non_finite_weights(lora_run, tmp_path, capsys):
    run_a, _ = lora_run
    argv = [
        "merge",
        str(run_a),
        str(run_a / "adapter"),
        "--weights",
        "nan,nan",
        str(tmp_path / "m"),
    ]
    err = one_line_error(capsys, main(argv))
    assert err == "dist-ft: error: --weights=nan,nan: every weight must be finite"
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("value", "seal", "message"),
    [
        (1.18e29, False, "adapter: adapter_model.safetensors is missing or does not match"),
        (1.18e29, True, "holds a weight of magnitude 1.18e+29, past 65504"),
        (float("nan"), True, "holds 1 non-finite values (NaN or inf)"),
    ],
    ids=["damaged", "absurd", "nan"],
)
def test_bad_weights_are_refused_by_export_merge_and_compare(
    lora_run, tmp_path, capsys, value, seal, message
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run[0], run)
    weights = run / "adapter" / LORA_FILE
    corrupt(weights, value, seal)
    for argv in (
        ["export", str(run), "--merge", str(tmp_path / "m")],
        ["export", str(run), "--adapter", str(tmp_path / "a")],
        ["merge", str(run), str(lora_run[0]), str(tmp_path / "ab")],
        ["compare", str(run)],
    ):
        err = one_line_error(capsys, main(argv))
        assert str(weights.parent) in err and message in err, (argv, err)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "run"]  # nothing written
