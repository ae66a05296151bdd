"""What a run leaves behind, as a user meets it (issue #9): the plot of a reward that stays 0, a
finish that fails, an output directory that already holds a run, and Ctrl-C."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import terminal_sigint

from dist_ft.config import RunConfig

TESTS = Path(__file__).resolve().parents[1]
DIST_FT = str(Path(sys.executable).with_name("dist-ft"))
# `reward_fns:NAME` loads from tests/; the caller's PYTHONPATH still comes after it.
PATHS = [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
# A model load shows as a "Loading weights" bar, also in a pipe (which dist-ft turns bars off in)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(PATHS), "HF_HUB_DISABLE_PROGRESS_BARS": "0"}
SHORT = ["grpo.sft_warmup_steps=0", "run.wandb=disabled"]
# `train` with the demo's file, not `dist-ft demo`: the demo command always replaces its run.
DEMO = str(TESTS.parent / "configs" / "demo.yaml")


def launch(out: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [DIST_FT, "train", DEMO, *SHORT, f"run.output_dir={out}", *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=terminal_sigint,
        env=ENV,
    )


def run(out: Path, *overrides: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of a demo-config run to its end."""
    proc = launch(out, *overrides)
    stdout, stderr = proc.communicate(timeout=900)
    return proc.returncode, stdout, stderr


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


# ---------------------------------------------------------------- a reward that stays 0; finish


def test_reward_that_is_always_0_is_plotted_and_the_run_ends_with_its_summary(tmp_path):
    out = tmp_path / "zero"
    rc, stdout, stderr = run(
        out, "reward.functions=[{name: 'reward_fns:always_zero'}]", "run.steps=2"
    )
    assert rc == 0, stderr[-3000:]
    assert "mean reward: first 1 steps 0.000, last 1 steps 0.000" in stdout
    assert (out / "reward.png").stat().st_size > 1000


def test_failure_while_finishing_is_a_warning_not_a_lost_run(tmp_path):
    out = tmp_path / "run"
    (out / "reward.png").mkdir(parents=True)  # where the plot goes: savefig fails
    rc, stdout, stderr = run(out, "run.steps=2")
    assert rc == 0, stderr[-3000:]
    assert "finishing the run failed: IsADirectoryError" in stderr
    assert "mean reward: first 1 steps" in stdout and "plot: None" in stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- an output dir that holds a run


def test_fresh_run_refuses_a_directory_holding_another_run_and_resume_says_what_it_took(tmp_path):
    out = tmp_path / "run"
    ckpt = ["run.checkpoint_every=1", "run.keep_checkpoints=1", "run.plot=false"]
    rc, _, stderr = run(out, *ckpt, "run.steps=2", "run.resume=auto")
    assert rc == 0, stderr[-3000:]
    assert f"run.resume=auto: no checkpoint in {out / 'checkpoints'}; starting fresh" in stderr
    before = (out / "metrics.jsonl").read_bytes()

    # The same command again, without resume: refused at once, the old run untouched.
    t0 = time.perf_counter()
    rc, _, stderr = run(out, *ckpt, "run.steps=1")
    assert rc == 2, stderr[-3000:]
    error = stderr.strip().splitlines()[-1]
    assert f"run.output_dir={out} already holds another run (metrics.jsonl, checkpoints)" in error
    for way_out in ("another run.output_dir", "run.resume=auto", "run.overwrite=true"):
        assert way_out in error
    assert "Loading weights" not in stderr  # refused before any model was loaded
    print(f"refused in {time.perf_counter() - t0:.1f} s")
    assert (out / "metrics.jsonl").read_bytes() == before
    assert checkpoints(out) == ["step-00000002"]

    rc, _, stderr = run(out, *ckpt, "run.steps=3", "run.resume=auto")
    assert rc == 0, stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step-00000002'} (step 2)" in stderr
    assert steps(out) == [1, 2, 3]


@pytest.mark.skipif(
    "overwrite" not in {f.name for f in dataclasses.fields(RunConfig)},
    reason="run.overwrite is not in RunConfig yet",
)
def test_overwrite_replaces_the_old_run_so_resume_never_picks_its_checkpoints(tmp_path):
    out = tmp_path / "run"
    ckpt = ["run.checkpoint_every=1", "run.keep_checkpoints=2", "run.plot=false"]
    rc, _, stderr = run(out, *ckpt, "run.steps=3")
    assert rc == 0, stderr[-3000:]
    rc, _, stderr = run(out, *ckpt, "run.steps=1", "run.overwrite=true")
    assert rc == 0, stderr[-3000:]
    assert f"removed the previous run's outputs from {out}" in stderr
    # Before issue #9 the old step-3 checkpoint outlived the new run's step 1 and was resumed.
    assert checkpoints(out) == ["step-00000001"] and steps(out) == [1]


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_keeps_the_adapter_trained_so_far(tmp_path, tiny_path):
    out = tmp_path / "run"
    proc = launch(out, "run.steps=500", "run.checkpoint_every=0", "run.plot=false")
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() or len(steps(out)) < 2:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no two steps within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    print(f"exit code {proc.returncode}, {len(stderr.splitlines())} lines of stderr")

    (saved,) = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
    step = int(saved.split()[3].rstrip(":"))
    adapter = out / f"adapter-interrupted-step-{step}"
    assert saved == f"interrupted at step {step}: adapter saved to {adapter}"
    assert step >= 2 and step in [*steps(out), max(steps(out)) + 1]
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), adapter)
    lora_b = [v for k, v in model.state_dict().items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # trained, not the zero init
    assert torch.isfinite(torch.cat([v.flatten() for v in lora_b])).all()
    assert not (out / "adapter").exists()  # nothing that passes for a finished run


# ---------------------------------------------------------------- SIGTERM, damaged checkpoints,
# a full disk, a process that vanished (issue #20)

CKPT = ["run.checkpoint_every=1", "run.keep_checkpoints=2", "run.plot=false"]


def status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def export_adapter(out: Path, to: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DIST_FT, "export", str(out), "--adapter", str(to)], capture_output=True, text=True, env=ENV
    )


def wait_for_steps(proc: subprocess.Popen, out: Path, n: int) -> None:
    deadline = time.monotonic() + 1200  # start-up alone took 10 min on a 2-core box under load
    while not (out / "metrics.jsonl").exists() or len(steps(out)) < n:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"no {n} steps within 1200 s"
        time.sleep(0.05)


def test_sigterm_saves_the_adapter_and_a_checkpoint_that_resume_continues(tmp_path):
    """SLURM's time limit, scancel, `timeout`, a Kubernetes eviction: SIGTERM is Ctrl-C, with
    exit code 143, and with checkpoints on the run continues from the step it had reached."""
    out = tmp_path / "run"
    proc = launch(out, "run.steps=500", "run.checkpoint_every=50", "run.plot=false")
    wait_for_steps(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert lines[-1] == "dist-ft: interrupted (SIGTERM)"
    (saved,) = [line for line in lines if line.startswith("interrupted at step")]
    step = int(saved.split()[3].rstrip(":"))
    adapter = out / f"adapter-interrupted-step-{step}"
    assert saved == f"interrupted at step {step}: adapter saved to {adapter}"
    assert step >= 2 and steps(out) == list(range(1, step + 1))  # a whole step, never half
    assert load_file(adapter / "adapter_model.safetensors")
    ckpt = out / "checkpoints" / f"step-{step:08d}"
    assert (
        f"SIGTERM at step {step}: checkpoint saved to {ckpt} (continue with run.resume=auto)"
        in (lines)
    )
    assert status(out)["state"] == "interrupted" and status(out)["reason"] == "SIGTERM"
    assert not (out / "adapter").exists()

    # export refuses what did not finish, and says what it kept
    r = export_adapter(out, tmp_path / "x")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"dist-ft: error: {out} was interrupted at step {step} (SIGTERM): only a finished run "
        f"is exported; continue it with run.resume=auto (the weights it kept: {adapter.name})"
    )

    rc, _, stderr = run(out, f"run.steps={step + 2}", "run.checkpoint_every=50", "run.resume=auto")
    assert rc == 0, stderr[-3000:]
    assert f"the previous run in {out} was interrupted at step {step} (SIGTERM)" in stderr
    assert f"resuming from {ckpt} (step {step})" in stderr
    assert steps(out) == list(range(1, step + 3))
    assert status(out)["state"] == "finished" and status(out)["step"] == step + 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_damaged_commit_falls_back_and_all_corrupt_refuses_keeping_the_history(tmp_path):
    out = tmp_path / "run"
    rc, _, stderr = run(out, *CKPT, "run.steps=3")
    assert rc == 0, stderr[-3000:]
    ckpts = out / "checkpoints"
    assert checkpoints(out) == ["step-00000002", "step-00000003"]
    os.truncate(ckpts / "step-00000003" / "COMMIT", 40)

    rc, _, stderr = run(out, *CKPT, "run.steps=4", "run.resume=auto")
    assert rc == 0, stderr[-3000:]
    assert f"skipping corrupt checkpoint: {ckpts / 'step-00000003'}: its COMMIT file" in stderr
    assert f"resuming from {ckpts / 'step-00000002'} (step 2)" in stderr
    assert steps(out) == [1, 2, 3, 4]

    # every checkpoint damaged: refused in one line, before any model loads, history intact
    for name in checkpoints(out):
        os.truncate(ckpts / name / "COMMIT", 40)
    history = {f: (out / f).read_bytes() for f in ("metrics.jsonl", "ledger.jsonl")}
    rc, _, stderr = run(out, *CKPT, "run.steps=5", "run.resume=auto")
    assert rc == 2, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"dist-ft: error: run.resume=auto: every checkpoint in {ckpts} is corrupt "
        "(step-00000003, step-00000004; see the warnings above); nothing was changed: resume one "
        "by path with run.resume=PATH once repaired, start over with run.resume=none "
        "run.overwrite=true (deletes this run's metrics and checkpoints), or choose another "
        "run.output_dir"
    )
    assert "Loading weights" not in stderr
    assert {f: (out / f).read_bytes() for f in history} == history

    # no checkpoint at all, but a run's history: refused too, never "starting fresh"
    for name in checkpoints(out):
        shutil.rmtree(ckpts / name)
    rc, _, stderr = run(out, *CKPT, "run.steps=5", "run.resume=auto")
    assert rc == 2, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"dist-ft: error: run.resume=auto: {out} holds a run (metrics.jsonl, ledger.jsonl) but "
        f"{ckpts} has no checkpoint to continue it from; nothing was changed: start over with "
        "run.resume=none run.overwrite=true, or choose another run.output_dir"
    )
    assert {f: (out / f).read_bytes() for f in history} == history


@pytest.fixture
def small_disk(tmp_path):
    """A 1.3 MB tmpfs: room for two checkpoints of the tiny model (~530 KB each), not three."""
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1300k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_disk_full_during_a_checkpoint_says_so_removes_the_partial_keeps_the_rest(small_disk):
    from dist_ft.run.checkpoint import verify

    out = small_disk.parent
    rc, _, stderr = run(out, *CKPT, "run.steps=6")
    assert rc == 1, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"dist-ft: error: CheckpointError: no space left on {small_disk} writing the checkpoint "
        "of step 3 (its partial write is removed; kept: step-00000001, step-00000002): free "
        "space there, or lower run.keep_checkpoints, then continue with run.resume=auto"
    )
    assert "Traceback" not in stderr
    assert checkpoints(out) == ["step-00000001", "step-00000002"]  # no .partial-step-3 left
    for name in checkpoints(out):
        verify(small_disk / name)
    # the weights of step 3 were trained: kept, as on Ctrl-C, outside the full disk
    assert "stopped at step 3: adapter saved to" in stderr
    assert (out / "adapter-interrupted-step-3" / "adapter_model.safetensors").is_file()
    assert status(out)["state"] == "failed" and status(out)["step"] == 3
    assert status(out)["reason"].startswith("CheckpointError: no space left on")


def test_a_process_that_vanished_with_exit_0_is_told_apart_and_not_exported(tmp_path):
    out = tmp_path / "run"
    rc, _, _ = run(out, "reward.functions=[{name: 'reward_fns:exits_quietly'}]", "run.steps=5")
    assert rc == 0  # os._exit(0): nothing in the process can report it...
    s = status(out)
    assert s["state"] == "running" and s["step"] < 5  # ...but status.json was never finished
    r = export_adapter(out, tmp_path / "x")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"dist-ft: error: {out} ended without finishing (killed or crashed at step {s['step']}; "
        f"pid {s['pid']} on {s['host']} is gone): only a finished run is exported; continue it "
        "with run.resume=auto"
    )
    assert not (tmp_path / "x").exists()
