"""Layering rules: algos/ is pure torch; only learner.py imports deepspeed; only cluster/
imports ray, and of it only the modules that drive Ray."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "dist_ft"


def test_algos_import_neither_ray_nor_deepspeed():
    code = (
        "import sys, dist_ft.algos.grpo, dist_ft.algos.common, dist_ft.algos.dpo\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed'))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


def users_of(package: str) -> set[str]:
    return {
        p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if package in imported_roots(p)
    }


def test_only_learner_imports_deepspeed():
    assert users_of("deepspeed") == {"learner.py"}


def test_only_cluster_imports_ray():
    # base.py, local.py and placement.py stay Ray-free: debug mode and `dist-ft plan`'s
    # arithmetic run without it.
    assert users_of("ray") == {"cluster/ray.py", "cluster/connect.py"}


def test_importing_the_cluster_package_loads_no_ray():
    """Ray is imported where it is used, so local mode and the SLURM preflight never load it."""
    code = (
        "import sys, dist_ft.cluster, dist_ft.cluster.placement, dist_ft.recipes.plan\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'ray')\n"
        "print(bad[:5]); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_module_over_600_lines():
    long = {
        p.relative_to(PKG).as_posix(): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert long == {}


def modules_importing(module: str) -> set[str]:
    """dist_ft modules with an import of ``module`` (at any depth of the file)."""
    out = set()
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if module in names:
                out.add(p.relative_to(PKG).as_posix())
    return out


def test_components_take_typed_specs_not_the_config():
    """The config tree stops at the driver: the CLI, the recipes and run/ (whose specs.py
    turns it into RolloutSpec, LearnerSpec, ActorSpec), and the cluster factory that reads
    ``resources.*``. Learners, rollout workers, generators, models, rewards and the payload
    never see it."""
    driver = {"cli.py", "cluster/__init__.py", "cluster/connect.py"}
    users = modules_importing("dist_ft.config")
    assert {m for m in users if not m.startswith(("recipes/", "run/"))} == driver


def test_nothing_imports_the_recipes_but_the_cli():
    """A recipe is an entry point: what two of them share lives in run/, never in a recipe."""
    users = {
        p.relative_to(PKG).as_posix()
        for p in PKG.rglob("*.py")
        if any(
            (n.module or "").startswith("dist_ft.recipes")
            or (n.module == "dist_ft" and any(a.name == "recipes" for a in n.names))
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.ImportFrom)
        )
    }
    assert {u for u in users if not u.startswith("recipes/")} == {"cli.py"}
    # and no recipe imports another (each is read on its own)
    assert {u for u in users if u.startswith("recipes/")} == set()


def test_the_driver_builds_specs_without_loading_deepspeed():
    code = (
        "import sys, dist_ft.recipes.grpo, dist_ft.learner\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed')\n"
        "print(bad[:5]); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
