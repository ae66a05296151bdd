"""Layering rules: algos/ is pure torch; only learner.py imports deepspeed."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dist_ft"


def test_algos_import_neither_ray_nor_deepspeed():
    code = (
        "import sys, dist_ft.algos.grpo, dist_ft.algos.common\n"
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
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_learner_imports_deepspeed():
    users = {
        p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if "deepspeed" in imported_roots(p)
    }
    assert users == {"learner.py"}


def test_no_module_over_600_lines():
    long = {p.name: n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
