"""Doc test: README.md's commands, verbatim and in README order, as a newcomer runs them: on a
fresh copy of the checkout, with an empty HOME, in one shell, so what one command leaves behind
(`runs/demo` above all) is there for the next, and the README's own PATH step is the one that
puts `dist-ft` on PATH.

What this test changes, and why:
- Overrides where a run would take minutes, appended to the README's line (the last value of a
  key wins): `run.steps=3` for training commands, `ARGS='run.steps=3'` for `make demo` (the
  Makefile's documented way), `label.prompts=16` for `dist-ft label`. Never an output directory:
  the README's recipes must not collide as written.
- The copy reuses the checkout's built `.venv` and `.venv-vllm` (symlinks; building them takes
  minutes): files
  are copied with their times, so `make` finds the venv up to date for them. That venv's
  `dist-ft` would import the checkout's `dist_ft` (an editable install), so PYTHONPATH points
  at the copy, whose `dist_ft` then comes first (checked below).
- XDG_CACHE_HOME stays the user's: there DeepSpeed's comm-op build (~35 s on a quiet machine)
  is the one the rest of the suite made (TORCH_EXTENSIONS_DIR, when set, is kept too). dist_ft's
  own cache (the tiny model) and Ray's and wandb's files go to the empty HOME.
- Commands that need a service this test does not start run in their own test, which reads them
  from README.md (OWNERS). In their place here runs the check they make before anything starts:
  `launch/slurm/preflight.py` on the same config and overrides (what `launch/ray_submit.sh`
  runs before its upload and the sbatch script before Ray), so a recipe whose output directory
  an earlier one already holds fails here, in order.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from readme import ROOT, readme_lines

# Commands a dedicated test runs (reading them from README.md): prefix -> that test.
OWNERS = {
    ("make", "test"): ".ci/run",  # CI's own command; this test is part of it
    ("ray", "start", "--head"): "tests/slow/test_ray_submit.py",
    ("launch/ray_submit.sh",): "tests/slow/test_ray_submit.py",
    ("launch/ray_stop.py",): "tests/slow/test_ray_submit.py",
    ("sbatch",): "tests/slow/test_slurm.py",
    ("python", "launch/netns_hosts.py"): "tests/slow/test_fleet.py",
}
PREFLIGHT = "python launch/slurm/preflight.py"
TRAINS = ("demo", "train", "sft", "dpo")


def owner(argv: list[str]) -> str | None:
    return next((path for p, path in OWNERS.items() if tuple(argv[: len(p)]) == p), None)


def as_run_here(line: str) -> str:
    """The shell line this test runs for a README ``line``: the line itself with short-run
    overrides appended, or for a command another test owns, the check it makes first."""
    argv = shlex.split(line)
    if argv[0] == "launch/ray_submit.sh":  # its own leading resources.* first, as it does
        config, *overrides = argv[1:]
        return shlex.join([*PREFLIGHT.split(), config, "resources.mode=ray",
                           "resources.ray_address=auto", *overrides])  # fmt: skip
    if argv[0] == "sbatch":  # what the sbatch script passes to its preflight
        after = argv[argv.index("launch/slurm/dist_ft.sbatch") + 1 :]
        return shlex.join([*PREFLIGHT.split(), after[0], "resources.mode=ray", *after[1:]])
    if owner(argv):
        return ":"  # a service (or the whole suite): nothing to check before it
    if argv[:2] == ["make", "demo"]:
        return f"{line} ARGS='run.steps=3'"
    if argv[:2] == ["dist-ft", "label"]:
        return f"{line} label.prompts=16"
    if argv[0] == "dist-ft" and argv[1] in TRAINS and "--print-config" not in argv:
        return f"{line} run.steps={2 if 'resources.mode=ray' in argv else 3}"
    return line


def test_every_readme_command_is_run_by_a_test():
    for line in readme_lines():
        path = owner(shlex.split(line))
        if path is None:
            continue  # run in order below
        text = (ROOT / path).read_text()
        # the owner reads the command from README.md, so the two cannot drift apart
        assert "make test" in text if path == ".ci/run" else "readme" in text, path


def fresh_copy(dest: Path) -> None:
    """The files a commit of the working tree would hold (tracked and new, not ignored), with
    their times, and the checkout's built .venv linked in."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    (dest / ".venv-vllm").symlink_to(ROOT / ".venv-vllm")  # make test built it (make vllm-env)


def test_readme_commands_in_order_on_a_fresh_copy(tmp_path):
    repo, home = tmp_path / "repo", tmp_path / "home"
    home.mkdir()
    fresh_copy(repo)
    venv_bin = str(ROOT / ".venv" / "bin")
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "DIST_FT_CACHE", "WANDB_MODE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("RAY_")}
    env.update(
        HOME=str(home),
        PATH=os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin),
        PYTHONPATH=str(repo),
        XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"),
    )
    lines = readme_lines()
    source = lines.index("source .venv/bin/activate")
    script = ["command -v dist-ft && { echo '@@ dist-ft is on PATH already'; exit 99; }"]
    for i, line in enumerate(lines):
        script += [
            f"printf '\\n@@ %s\\n' {shlex.quote(as_run_here(line))}",
            "SECONDS=0",
            as_run_here(line),
            "rc=$?",
            'printf "@@ rc %d, %d s\\n" "$rc" "$SECONDS"',
            '[ "$rc" = 0 ] || exit "$rc"',
        ]
        if i == source:  # the copy's code is what the venv's dist-ft runs
            script.append("python -c 'import dist_ft.cli as c; print(\"@@ code\", c.__file__)'")
    log = tmp_path / "log"
    with log.open("w") as f:
        r = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=2700,
        )  # fmt: skip
    text = log.read_text()
    # one section per command: its line, its output, its exit code and seconds
    sections = re.findall(
        r"^@@ (?!rc |code )([^\n]*)\n(.*?)^@@ rc (\d+), (\d+) s$", text, re.S | re.M
    )
    print("\n".join(f"{int(s):4d} s  rc {rc}  {cmd}" for cmd, _, rc, s in sections))
    assert r.returncode == 0, text[-6000:]
    assert f"@@ code {repo}/dist_ft/cli.py" in text, text[:3000]
    assert [cmd for cmd, *_ in sections] == [as_run_here(line) for line in lines]
    for (_, out, _, _), line in zip(sections, lines, strict=True):
        argv = shlex.split(line)
        if argv[:2] == ["make", "demo"]:
            assert "mean reward: first" in out, out
        if argv[0] != "dist-ft":
            continue
        if "--print-config" in argv:  # the recipe's model and data are not on this machine
            assert "model:" in out and "dist-ft: warning: model.path=" in out, out
        elif argv[1] == "plan":  # this machine as it is, not a Ray sized to the request
            assert f"node 127.0.0.1: {{'CPU': {float(os.cpu_count() or 1)}" in out, out
        elif argv[1] in ("sft", "dpo"):
            assert f"{argv[1]} loss: first" in out, out
        elif argv[1] in TRAINS:
            assert "mean reward: first" in out, out
        elif argv[1] == "compare":
            assert "Mean reward over " in out, out
        elif argv[1] == "label":
            assert " pairs from 16 prompts -> " in out, out
    for made in ("runs/demo", "runs/from-file", "runs/lr5e-4", "runs/multitask_demo",
                 "runs/sft-demo", "runs/dpo-demo", "runs/rlaif_dpo_demo", "runs/ray",
                 "runs/env_calculator_sft", "runs/smollm2-calculator"):  # fmt: skip
        assert (repo / made / "metrics.jsonl").is_file(), made
    for made in ("out/merged", "out/adapter", "out/ab", "out/ties"):
        assert any((repo / made).rglob("*.safetensors")), made
