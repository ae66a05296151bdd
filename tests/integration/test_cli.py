"""The `dist-ft` command itself: its help, its start-up cost, Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import terminal_sigint

DIST_FT = Path(sys.executable).with_name("dist-ft")  # the console script pip installed


def test_help_imports_nothing_heavy():
    # torch, datasets and transformers cost 5-20 s to import; --help needs none of them.
    code = (
        "import sys\n"
        "from dist_ft.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'datasets', 'transformers', 'deepspeed', 'ray', 'peft')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_help_describes_every_subcommand():
    r = subprocess.run([str(DIST_FT), "--help"], capture_output=True, text=True, check=True)
    commands = re.search(r"\{([\w,-]+)\}", r.stdout).group(1).split(",")
    description = r.stdout.split("positional arguments")[0].split("\n", 1)[1]
    assert {"train", "plan", "demo"} <= set(commands)
    assert [c for c in commands if c not in description] == []


def interrupt_when(proc: subprocess.Popen, ready: Path, timeout_s: float) -> tuple[str, str]:
    """Ctrl-C (SIGINT, as a terminal sends it) once ``ready`` exists; the process's output."""
    try:
        deadline = time.monotonic() + timeout_s
        while not (ready.is_file() and ready.stat().st_size) and proc.poll() is None:
            assert time.monotonic() < deadline, f"{ready} did not appear in {timeout_s} s"
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # a failed assertion must not leave a training run behind
            proc.kill()
            proc.communicate()


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    # A reward module that is slow to import keeps the run at a known point (the check of the
    # reward functions) until the real SIGINT arrives.
    (tmp_path / "slowreward.py").write_text(
        "import pathlib, time\n"
        "pathlib.Path('importing').write_text('x')\n"
        "time.sleep(300)\n"
        "def score(prompts, completions, answers):\n    return [0.0] * len(completions)\n"
    )
    proc = subprocess.Popen(
        [str(DIST_FT), "demo", "reward.functions=[{name: 'slowreward:score'}]"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=terminal_sigint,
    )
    _, err = interrupt_when(proc, tmp_path / "importing", timeout_s=300)
    assert proc.returncode == 130
    assert err.strip() == "dist-ft: interrupted"


def test_ctrl_c_during_training_prints_no_traceback(tmp_path):
    proc = subprocess.Popen(
        [
            str(DIST_FT),
            "demo",
            "run.steps=100000",
            "grpo.sft_warmup_steps=0",
            "run.wandb=disabled",
            "run.plot=false",
            "run.output_dir=out",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=terminal_sigint,
    )
    _, err = interrupt_when(proc, tmp_path / "out" / "metrics.jsonl", timeout_s=600)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "dist-ft: interrupted"


def test_demo_never_replaces_an_unfinished_run_it_kept_weights_of(tmp_path):
    """`dist-ft demo` replaces its last run, but not one stopped early: adapter-interrupted-step-N/
    is the only copy of what that run trained, and the user was told where it is."""
    out = tmp_path / "demo"
    kept = out / "adapter-interrupted-step-7"
    kept.mkdir(parents=True)
    (kept / "adapter_model.safetensors").write_bytes(b"trained")
    (out / "metrics.jsonl").write_text('{"step": 7}\n')
    r = subprocess.run(
        [str(DIST_FT), "demo", f"run.output_dir={out}"], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"dist-ft: error: run.output_dir={out} holds adapter-interrupted-step-7 of a demo run that "
        "did not finish: continue it with run.resume=auto, replace it with run.overwrite=true, or "
        "choose another run.output_dir"
    )
    assert (kept / "adapter_model.safetensors").read_bytes() == b"trained"


def test_print_config_warns_of_a_missing_model_and_data(tmp_path):
    """The config prints (exit 0), and stderr names what a run would not find: one line each."""
    r = subprocess.run(
        [str(DIST_FT), "train", "configs/demo.yaml", f"model.path={tmp_path / 'no-model'}",
         f"data.source={tmp_path / 'no.jsonl'}", "grpo.sft_warmup_steps=0", "--print-config"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("model:"), r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("dist-ft: warning: ")]
    assert len(warnings) == 2, r.stderr
    assert warnings[0].startswith(f"dist-ft: warning: model.path={tmp_path / 'no-model'} is not")
    assert warnings[1].startswith(
        f"dist-ft: warning: data.source={tmp_path / 'no.jsonl'} does not exist here"
    )
    r = subprocess.run(  # the built-in recipe has both: no warning
        [str(DIST_FT), "train", "configs/demo.yaml", "--print-config"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
