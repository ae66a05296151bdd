"""Doc tests: every command README.md shows is run by a test, as written.

The `dist-ft` commands run here, verbatim from the README, with only documented `a.b=c`
overrides appended where a run would otherwise take minutes (fewer steps, an output directory
in tmp). The others run in the test named for them, which reads the command from the README too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from readme import ROOT, readme_commands

BIN = Path(sys.executable).parent
# Commands a dedicated test runs (reading them from README.md): prefix -> test file.
ELSEWHERE = {
    ("make", "test"): ".ci/run",  # CI's own command
    ("make", "demo"): "tests/slow/test_demo.py",
    ("ray", "start", "--head"): "tests/slow/test_ray_submit.py",
    ("launch/ray_submit.sh",): "tests/slow/test_ray_submit.py",
    ("launch/ray_stop.py",): "tests/slow/test_ray_submit.py",
    ("sbatch",): "tests/slow/test_slurm.py",
}


def _owner(argv: list[str]) -> str | None:
    for prefix, path in ELSEWHERE.items():
        if tuple(argv[: len(prefix)]) == prefix:
            return path
    return None


DIST_FT = [argv for argv in readme_commands() if argv[0] == "dist-ft"]


def test_every_readme_command_is_run_by_a_test():
    for argv in readme_commands():
        if argv[0] == "dist-ft":
            continue  # test_readme_dist_ft_command below
        owner = _owner(argv)
        assert owner is not None, f"no test runs the README command {' '.join(argv)!r}"
        text = (ROOT / owner).read_text()
        # the owner reads the command from README.md, so the two cannot drift apart
        assert "make test" in text if owner == ".ci/run" else "readme" in text, owner


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Finished runs for the README's export and merge commands, named as there (runs/demo,
    runs/a, runs/b): short SFT runs of the tiny LoRA recipe, a and b from different seeds."""
    root = tmp_path_factory.mktemp("runs")
    for name, seed in (("demo", 0), ("a", 1), ("b", 2)):
        r = subprocess.run(
            [
                str(BIN / "dist-ft"),
                "sft",
                "configs/sft_demo.yaml",
                "run.steps=1",
                "run.eval_every=0",
                f"run.seed={seed}",
                "run.wandb=disabled",
                f"run.output_dir={root / name}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def rlaif(tmp_path_factory) -> Path:
    """runs/rlaif_dpo_demo for the README's `dist-ft label` and for the `dist-ft dpo` after it,
    which trains on what label wrote (the two run in README order)."""
    return tmp_path_factory.mktemp("rlaif_dpo_demo")


@pytest.mark.slow
@pytest.mark.parametrize("argv", DIST_FT, ids=[" ".join(a[1:3]) for a in DIST_FT])
def test_readme_dist_ft_command(argv, tmp_path, request):
    extra: list[str] = []
    argv = [a.replace("HOST:PORT", "local") for a in argv]  # plan: describe this machine
    if argv[1] in ("export", "merge", "compare"):  # the README's run and output paths, made here
        root = request.getfixturevalue("runs")
        argv = [a.replace("runs/", f"{root}/").replace("out/", f"{tmp_path}/out/") for a in argv]
    if argv[1] == "label" or any(a.startswith("data.source=runs/rlaif_dpo_demo/") for a in argv):
        rlaif = request.getfixturevalue("rlaif")
        argv = [a.replace("runs/rlaif_dpo_demo/", f"{rlaif}/") for a in argv]
        if argv[1] == "label":  # a smaller run: 16 prompts x 4 samples
            extra += [f"label.output={rlaif}/labels.jsonl", "label.prompts=16"]
            extra.append("rollout.group_size=4")
    if "--print-config" not in argv and argv[1] in ("train", "demo", "sft", "dpo"):
        extra.append(f"run.output_dir={tmp_path / 'run'}")
        if not any(a.startswith("run.steps=") for a in argv):
            extra.append("run.steps=3")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(
        [*argv, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, (argv, r.stdout[-2000:], r.stderr[-3000:])
    if "--print-config" in argv:
        assert "model:" in r.stdout
    elif argv[1] == "plan":
        assert "rollout" in r.stdout
    elif argv[1] in ("sft", "dpo"):
        assert f"{argv[1]} loss: first" in r.stdout
        assert (tmp_path / "run" / "metrics.jsonl").exists()
    elif argv[1] in ("export", "merge"):
        assert any((tmp_path / "out").rglob("*.safetensors")), r.stdout
    elif argv[1] == "compare":
        assert r.stdout.startswith("Mean reward over "), r.stdout
    elif argv[1] == "label":
        assert " pairs from 16 prompts -> " in r.stdout
    else:
        assert "mean reward: first" in r.stdout
        assert (tmp_path / "run" / "metrics.jsonl").exists()
