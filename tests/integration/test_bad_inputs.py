"""Bad input never hangs and is never silently wrong (issue #9).

Each row is a real ``dist-ft`` run, as a user types it, in a fresh directory holding the row's
files. It must stop before training starts (no output directory, so no model loaded and nothing
written) with the row's exit code, a message naming what to fix, and no traceback.

To add a case, add a row to ROWS.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
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
    out: str = "out"  # the run.output_dir given to train and demo runs
    readonly: str | None = None  # a folder mounted as a read-only filesystem (needs root)
    loads: bool = False  # stopped only after the model loaded (the run's directory exists)
    # A copy of a finished run (support.make_run) at "run", damaged by this before the command
    damage: Callable[[Path], None] | None = None


SCORE = "def score(prompts, completions, answers):\n    return [0.0] * len(completions)\n"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


ADAPTER = "run/adapter/adapter_model.safetensors"  # in the copy of a finished run
# A user's rollout engines: one that is no Generator, one that refuses its spec
ENGINES = (
    "class Half:\n    def __init__(self, spec):\n        pass\n\n"
    "def make(spec):\n    return Half(spec)\n\n"
    "class Refuses:\n    def __init__(self, spec):\n        raise RuntimeError('needs a GPU')\n"
    "    def generate(self, prompts, n): ...\n    def load_weights(self, tensors): ...\n"
    "    def export_weights(self): ...\n"
)
JUDGED = "reward:\n  functions:\n    - name: judge\n  judge:\n    constitution: k.yaml\n"


def header_damaged(run: Path) -> None:
    """The adapter's safetensors JSON header overwritten, no manifest (an older dist_ft's run)."""
    f = run / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:8] + b"#" * 16 + f.read_bytes()[24:])
    (run / "adapter" / "MANIFEST.json").unlink()


def absurd_weight(run: Path) -> None:
    """8 bytes flipped: a weight of 1.18e29 in the adapter the run saved."""
    from support import corrupt

    corrupt(run / "adapter" / "adapter_model.safetensors", 1.18e29, seal=False)


def absurd_weight_sealed(run: Path) -> None:
    """The same weight as a diverged run would have saved it: the manifest agrees."""
    from support import corrupt

    corrupt(run / "adapter" / "adapter_model.safetensors", 1.18e29, seal=True)


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
    override("grpo.beta=-0.1", "grpo.beta=-0.1: must be >= 0"),
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
    # ---- issue 20, item 5: what still ended in a traceback
    row(
        "output-dir-is-a-file",
        "demo",
        fragment="run.output_dir=out is a file, not a directory: give a directory",
        files={"out": "notes"},
    ),
    row(
        "output-dir-on-read-only-filesystem",  # was OSError [Errno 30] from mkdir
        "demo",
        fragment="run.output_dir=ro/run (its nearest existing folder ro) is on a read-only "
        "filesystem: give a writable directory",
        out="ro/run",
        readonly="ro",
    ),
    row(
        "override-unclosed-list",  # was yaml.scanner.ParserError
        "demo",
        "rollout.group_size=[8",
        fragment="command-line override 'rollout.group_size=[8': '[8' is not a YAML value "
        "(expected ',' or ']', but got '<stream end>'); close it or quote it",
    ),
    row(
        "override-unclosed-mapping",
        "demo",
        "peft.adapters={a:",
        fragment="command-line override 'peft.adapters={a:': '{a:' is not a YAML value",
    ),
    row(
        "generator-module-missing",  # was a [rank0] traceback after the model loaded
        "demo",
        "rollout.generator=nomod:Engine",
        fragment="rollout.generator=nomod:Engine: cannot import nomod (ModuleNotFoundError: "
        "No module named 'nomod')",
    ),
    row(
        "generator-not-a-generator",
        "demo",
        "rollout.generator=engines:Half",
        fragment="rollout.generator=engines:Half: Half is not a dist_ft.rollout.Generator: it "
        "has no generate, load_weights",
        files={"engines.py": ENGINES},
    ),
    row(
        "env-cannot-import",
        "demo",
        "env.name=nope_env:Env",
        fragment="env.name=nope_env:Env: cannot import nope_env (ModuleNotFoundError: No module "
        "named 'nope_env')",
    ),
    row(
        "env-not-an-environment",
        "demo",
        "env.name=engines:Half",
        fragment="env.name=engines:Half: Half is not a dist_ft.envs.Environment: it has no "
        "reset, step",
        files={"engines.py": ENGINES},
    ),
    row(
        "env-with-sft",
        "demo",
        "algo.objective=sft",
        "env.name=calculator",
        fragment="env.name runs episodes for GRPO (dist-ft train); algo.objective=sft trains on "
        "a dataset: remove env.name",
    ),
    row(
        "env-source-unknown-task",
        "demo",
        "data.source=reasoning_gym/no_such_task",
        "env.name=reasoning_gym",
        "grpo.sft_warmup_steps=0",
        fragment="data.source=reasoning_gym/no_such_task: Dataset 'no_such_task' not registered",
        loads=True,  # the data is read after the run directory is made, before the model loads
    ),
    row(
        "generator-not-a-class",
        "demo",
        "rollout.generator=engines:make",
        fragment="rollout.generator=engines:make: engines.make is a function, not a class",
        files={"engines.py": ENGINES},
    ),
    row(
        "generator-constructor-raises",  # only building it tells: after the model loaded
        "demo",
        "rollout.generator=engines:Refuses",
        fragment="rollout.generator=engines:Refuses: Refuses(spec) raised RuntimeError: "
        "needs a GPU",
        files={"engines.py": ENGINES},
        loads=True,
    ),
    row(
        "constitution-empty-list",  # was a JudgeError traceback after the models loaded
        "label",
        "c.yaml",
        fragment="reward.judge.constitution: constitution 'k.yaml' must be a mapping with "
        "'principles: [...]' and an optional 'name', not a list",
        files={"c.yaml": JUDGED, "k.yaml": "[]\n"},
    ),
    row(
        "export-header-damaged",  # was SafetensorError from peft, after the base loaded
        "export",
        "run",
        "--merge",
        "merged",
        fragment=f"{ADAPTER} is not a readable safetensors file (Error while deserializing header",
        damage=header_damaged,
    ),
    row(
        "export-absurd-weight",  # was merged silently, exit 0
        "export",
        "run",
        "--merge",
        "merged",
        fragment="run/adapter: adapter_model.safetensors is missing or does not match "
        "MANIFEST.json: the weights changed after they were saved",
        damage=absurd_weight,
    ),
    row(
        "export-absurd-weight-sealed",
        "export",
        "run",
        "--merge",
        "merged",
        fragment=f"{ADAPTER}: tensor base_model.model.model.layers.0.mlp.down_proj.lora_A"
        ".weight holds a weight of magnitude 1.18e+29, past 65504",
        damage=absurd_weight_sealed,
    ),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """A finished run (built on first use: most rows need none)."""
    made: list[Path] = []

    def get() -> Path:
        if not made:
            from support import make_run

            made.append(make_run(tmp_path_factory.mktemp("finished"), seed=1)[0])
        return made[0]

    return get


@pytest.fixture
def readonly_mounts() -> Iterator[list[Path]]:
    """Folders to mount as read-only tmpfs (as root: chmod does not stop root), unmounted after."""
    mounted: list[Path] = []
    yield mounted
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("bad", ROWS)
def test_bad_input_fails_fast_with_a_message(
    bad: Bad, tmp_path: Path, finished_run: Callable[[], Path], readonly_mounts: list[Path]
) -> None:
    if bad.readonly is not None:
        path = tmp_path / bad.readonly
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)])
        if r.returncode != 0:
            pytest.skip("mounting a read-only tmpfs needs root")
        readonly_mounts.append(path)
    if bad.damage is not None:
        shutil.copytree(finished_run(), tmp_path / "run")
        bad.damage(tmp_path / "run")
    for name, text in bad.files.items():
        path = tmp_path / name
        if name.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    args = list(bad.args)
    if args[0] in ("train", "demo"):
        args.append(f"run.output_dir={bad.out}")
    if bad.script:
        assert DIST_FT.is_file(), f"{DIST_FT} missing: install the package (pip install -e .)"
        cmd = [str(DIST_FT), *args]
    else:
        cmd = [sys.executable, "-m", "dist_ft.cli", *args]
    # A hang fails the test (TimeoutExpired) instead of stalling the suite; a row that loads
    # the model (and DeepSpeed) takes 30-40 s alone, minutes on a busy machine.
    timeout = 900 if bad.loads else 300
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == bad.code, r.stderr[-3000:]
    assert bad.fragment in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("dist-ft: error: ")
    if bad.absent is not None:
        assert bad.absent not in r.stderr
    # Training never started: it creates the output directory before it loads anything.
    assert bad.loads == (tmp_path / bad.out).is_dir()
    if bad.damage is not None:  # an export writes nothing when it refuses
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
