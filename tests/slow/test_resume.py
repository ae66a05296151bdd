"""Kill and resume, for real: `dist-ft` processes SIGKILLed mid-run and mid-checkpoint-write."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
DIST_FT = str(Path(sys.executable).with_name("dist-ft"))
RECIPE = [
    "run.steps=8",
    "run.checkpoint_every=2",
    "run.keep_checkpoints=2",
    "grpo.sft_warmup_steps=2",
    "run.wandb=disabled",
    "run.plot=false",
]


def launch(out: Path, *extra: str, deterministic: bool = True) -> subprocess.Popen:
    return subprocess.Popen(
        [
            DIST_FT,
            "demo",
            *RECIPE,
            f"run.deterministic={str(deterministic).lower()}",
            f"run.output_dir={out}",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL ``proc`` the moment ``ready()`` holds (polled every millisecond)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the kill point: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kill point never reached")
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return err


def ledger_ids(out: Path) -> list[list[list[int]]]:
    rows = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    return [[s[:3] for s in row["samples"]] for row in rows]


def engine_state(ckpt: Path) -> dict:
    """Weights and optimizer state of a learner checkpoint, as loaded tensors."""
    files = sorted((ckpt / "deepspeed" / "state").glob("*.pt"))
    assert files, f"no DeepSpeed state in {ckpt}"
    return {f.name: torch.load(f, map_location="cpu", weights_only=False) for f in files}


def assert_equal_tree(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{where}[{i}]")


@pytest.mark.parametrize("deterministic", [True, False])
def test_kill_mid_run_and_mid_checkpoint_then_resume_is_exact(tmp_path, deterministic):
    """Deterministic mode reseeds sampling per share; otherwise the checkpoint carries the
    sampling RNG. Either way the resumed run is the uninterrupted one, bit for bit."""
    t0 = time.perf_counter()
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    finish(launch(ref, deterministic=deterministic))

    # 1. SIGKILL between checkpoints: step 4 is committed, step 5 is being trained.
    proc = launch(run, deterministic=deterministic)
    kill_when(proc, lambda: (run / "checkpoints" / "step-00000004" / "COMMIT").exists())

    # 2. Resume, and SIGKILL while the step-6 checkpoint is being written.
    partial = run / "checkpoints" / ".partial-step-00000006"
    proc = launch(run, "run.resume=auto", deterministic=deterministic)
    kill_when(proc, partial.exists)
    assert partial.exists() and not (run / "checkpoints" / "step-00000006").exists()

    # 3. Resume again: the partial write is named and never chosen; step 4 is.
    err = finish(launch(run, "run.resume=auto", deterministic=deterministic))
    assert ".partial-step-00000006" in err
    print(f"kill/resume test: {time.perf_counter() - t0:.1f} s")

    # Same data, in the same order, each sample trained once.
    assert ledger_ids(run) == ledger_ids(ref)
    losses = [
        [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (ref, run)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    # Parameters and optimizer state equal bit for bit.
    a = load_file(ref / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = "checkpoints/step-00000008"
    assert_equal_tree(engine_state(ref / final), engine_state(run / final))


def test_resume_refuses_changed_recipe_and_names_the_key(tmp_path):
    out = tmp_path / "run"
    finish(launch(out, "run.steps=2"))
    r = subprocess.run(
        [
            DIST_FT,
            "demo",
            *RECIPE,
            f"run.output_dir={out}",
            "run.resume=auto",
            "grpo.eps_high=0.28",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert "grpo.eps_high" in r.stderr and "resume_allow_changes" in r.stderr
    # more steps (not a semantic change) resume fine: steps 3..4 are added to the same run
    finish(launch(out, "run.resume=auto", "run.steps=4"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_sft_killed_mid_run_resumes_bit_exact(tmp_path):
    """`dist-ft sft`, SIGKILLed after its step-3 checkpoint, resumed: the same losses and the
    same adapter, bit for bit, as the run that was never stopped."""

    def sft(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                DIST_FT,
                "sft",
                str(ROOT / "configs" / "sft_demo.yaml"),
                "run.steps=6",
                "run.checkpoint_every=3",
                "run.eval_every=0",
                "run.deterministic=true",
                "run.wandb=disabled",
                "run.plot=false",
                f"run.output_dir={out}",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    finish(sft(ref))
    proc = sft(run)
    kill_when(proc, lambda: (run / "checkpoints" / "step-00000003" / "COMMIT").exists())
    finish(sft(run, "run.resume=auto"))
    losses = [
        [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (ref, run)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    a = load_file(ref / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
