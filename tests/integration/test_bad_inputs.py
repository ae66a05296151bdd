"""Bad input never hangs and is never silently wrong (issue #9).

Each row is a real ``dist-ft`` run, as a user types it, in a fresh directory holding the row's
files. It must stop before training starts (no output directory, so no model loaded and nothing
written) with the row's exit code, a message naming what to fix, and no traceback.

To add a case, add a row to ROWS.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

DIST_FT = Path(sys.executable).with_name("dist-ft")  # the console script pip installed


@dataclass(frozen=True)
class Bad:
    args: tuple[str, ...]  # after `dist-ft`; train and demo runs also get run.output_dir=out
    fragment: str  # must appear in stderr
    code: int = 2
    # Written into the run's directory first: relative path -> text; "dir/" is an empty folder.
    files: Mapping[str, str] = field(default_factory=dict)
    absent: str | None = None  # must not appear in stderr, e.g. a source wrongly blamed
    script: bool = False  # run the console script instead of `python -m dist_ft.cli`


SCORE = "def score(prompts, completions, answers):\n    return [0.0] * len(completions)\n"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def row(id: str, *args: str, fragment: str, marks: Any = (), **kw: Any) -> Any:
    return pytest.param(Bad(args, fragment, **kw), id=id, marks=marks)


def override(setting: str, message: str) -> Any:
    """A `dist-ft demo` override out of range: the message names key, value, range and source."""
    return row(setting, "demo", setting, fragment=f"command-line override '{setting}': {message}")


ROWS = [
    # ---- item 1: every numeric key is range-checked at load time, naming the source
    override("algo.prompts_per_step=0", "algo.prompts_per_step=0: must be >= 1"),
    override("rollout.max_new_tokens=0", "rollout.max_new_tokens=0: must be >= 1"),
    override("rollout.temperature=0", "rollout.temperature=0: must be > 0"),
    override("learner.lr=-1e-4", "learner.lr=-1e-4: must be > 0"),
    override("peft.r=0", "peft.r=0: must be >= 1"),
    override("resources.learners=0", "resources.learners=0: must be >= 1"),  # was ZeroDivision
    override("learner.micro_batches=0", "learner.micro_batches=0: must be >= 1"),
    override("run.steps=0", "run.steps=0: must be >= 1"),
    override("run.steps=-3", "run.steps=-3: must be >= 1"),
    override("algo.beta=-0.1", "algo.beta=-0.1: must be >= 0"),
    override("rollout.top_p=0", "rollout.top_p=0: must be in (0, 1]"),
    override("rollout.top_p=1.5", "rollout.top_p=1.5: must be in (0, 1]"),
    override("learner.lr=.nan", "learner.lr=nan: must be finite"),
    override(
        "rollout.group_size=1", "rollout.group_size=1: must be >= 2 (advantages are group-relative)"
    ),
    row(
        "bad-value-in-file",
        "train",
        "c.yaml",
        fragment="c.yaml: rollout.temperature=0: must be > 0",
        files={"c.yaml": "rollout:\n  temperature: 0\n"},
    ),
    row(
        "override-blamed-not-file",
        "train",
        "c.yaml",
        "rollout.temperature=0",
        fragment="command-line override 'rollout.temperature=0': rollout.temperature=0",
        files={"c.yaml": "rollout:\n  temperature: 0.7\n"},
        absent="c.yaml",
    ),
    row(
        "file-blamed-not-override",
        "train",
        "c.yaml",
        "rollout.temperature=0.5",
        fragment="c.yaml: learner.lr=-1: must be > 0",
        files={"c.yaml": "learner:\n  lr: -1\n"},
        absent="override",
    ),
    row(
        "cross-field-names-both-sources",
        "train",
        "c.yaml",
        "resources.learners=2",
        fragment="c.yaml and command-line override 'resources.learners=2': "
        "algo.prompts_per_step x rollout.group_size = 9 samples must split evenly",
        files={"c.yaml": "algo:\n  prompts_per_step: 3\nrollout:\n  group_size: 3\n"},
    ),
    row(
        "unknown-key",
        "demo",
        "learner.lrr=1",
        fragment="unknown config key 'learner.lrr'; did you mean 'learner.lr'?",
        script=True,
    ),
    row(
        "unknown-key-in-file",
        "train",
        "c.yaml",
        fragment="c.yaml: unknown config key 'learner.lrr'",
        files={"c.yaml": "learner:\n  lrr: 1\n"},
    ),
    row("wrong-type", "demo", "rollout.group_size=four", fragment="expected int, got str"),
    row("no-rewards", "demo", "reward.functions=[]", fragment="reward.functions is empty"),
    # ---- item 2: files that are not configs
    row(
        "empty-yaml",
        "train",
        "empty.yaml",
        fragment="empty.yaml is empty (it sets no keys); to train the built-in defaults run "
        "`dist-ft demo`",
        files={"empty.yaml": ""},
    ),
    row(
        "comments-only-yaml",
        "train",
        "c.yaml",
        fragment="c.yaml is empty",
        files={"c.yaml": "# learner:\n#   lr: 0.1\n"},
    ),
    row(
        "config-is-a-directory",
        "train",
        "configs",
        fragment="config path configs is a directory, not a YAML file",
        files={"configs/": ""},
    ),
    row("config-missing", "train", "nope.yaml", fragment="config file not found: nope.yaml"),
    # ---- item 3: a device this machine lacks
    row(
        "cuda-without-cuda",
        "demo",
        "resources.device=cuda",
        fragment="resources.device=cuda but torch sees no CUDA device",
        marks=NO_CUDA,
    ),
    # ---- item 4: model directories that cannot load
    row(
        "empty-model-dir",
        "demo",
        "model.path=m",
        fragment="model.path=m is not a complete HF model directory: it has no config.json, "
        "no tokenizer files",
        files={"m/": ""},
    ),
    row(
        "model-dir-without-tokenizer",
        "demo",
        "model.path=m",
        fragment="it has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json or "
        "vocab.txt), no weights",
        files={"m/config.json": "{}"},
        absent="no config.json",
    ),
    row(
        "model-path-missing",
        "demo",
        "model.path=nowhere",
        fragment="model.path=nowhere is not a local directory (dist_ft never downloads from a "
        "hub); fetch the model with `hf download ID --local-dir nowhere`",
        absent="huggingface-cli",
    ),
    row(
        "judge-model-dir-empty",
        "demo",
        "reward.functions=[{name: judge}]",
        "reward.judge.model.path=m",
        fragment="reward.judge.model.path=m is not a complete HF model directory",
        files={"m/": ""},
    ),
    # ---- item 6: reward modules resolve from the working directory, as with `python -m`
    row(
        "cwd-reward-module-is-imported",  # the module imports: the error is about its function
        "demo",
        "reward.functions=[{name: 'myrewards:nope'}]",
        fragment="reward.functions[0].name: cannot load reward 'myrewards:nope': "
        "module 'myrewards' has no attribute 'nope'",
        files={"myrewards.py": SCORE},
        script=True,
    ),
    row(
        "cwd-reward-function-resolves",  # past the reward check, stopped by the next one
        "demo",
        "reward.functions=[{name: 'myrewards:score'}]",
        "model.path=m",
        fragment="model.path=m is not a complete HF model directory",
        files={"myrewards.py": SCORE, "m/": ""},
        absent="reward",
        script=True,
    ),
    row(
        "reward-module-missing",
        "demo",
        "reward.functions=[{name: 'nomod:score'}]",
        fragment="reward.functions[0].name: cannot load reward 'nomod:score': "
        "No module named 'nomod'",
    ),
]


@pytest.mark.parametrize("bad", ROWS)
def test_bad_input_fails_fast_with_a_message(bad: Bad, tmp_path: Path) -> None:
    for name, text in bad.files.items():
        path = tmp_path / name
        if name.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    args = list(bad.args)
    if args[0] in ("train", "demo"):
        args.append("run.output_dir=out")
    if bad.script:
        assert DIST_FT.is_file(), f"{DIST_FT} missing: install the package (pip install -e .)"
        cmd = [str(DIST_FT), *args]
    else:
        cmd = [sys.executable, "-m", "dist_ft.cli", *args]
    # A hang fails the test (TimeoutExpired) instead of stalling the suite.
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == bad.code, r.stderr[-3000:]
    assert bad.fragment in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("dist-ft: error: ")
    if bad.absent is not None:
        assert bad.absent not in r.stderr
    # Training never started: it creates the output directory before it loads anything.
    assert not (tmp_path / "out").exists()
