"""Layering rules: algos/ is pure torch; only learner.py imports deepspeed; only cluster/
imports ray, and of it only the modules that drive Ray."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "dist_ft"


def test_algos_import_neither_ray_nor_deepspeed():
    assert (
        loaded_by(
            "import dist_ft.algos.grpo, dist_ft.algos.common, dist_ft.algos.dpo",
            ("ray", "deepspeed"),
        )
        == []
    )


def loaded_by(code: str, roots: tuple[str, ...]) -> list[str]:
    """The modules of packages ``roots`` that running ``code`` in a fresh interpreter loads."""
    probe = (
        f"import sys\n{code}\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {roots!r}))"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return ast.literal_eval(r.stdout.strip().splitlines()[-1])


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
    assert users_of("ray") == {
        "cluster/ray.py",
        "cluster/connect.py",
        "cluster/fleet.py",
        "cluster/nodes.py",
        "sync/collective.py",
        "sync/object_store.py",
    }


def test_importing_the_cluster_package_loads_no_ray():
    """Ray is imported where it is used, so local mode and the SLURM preflight never load it."""
    code = "import dist_ft.cluster, dist_ft.cluster.placement, dist_ft.recipes.plan"
    assert loaded_by(code, ("ray",)) == []


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
    assert loaded_by("import dist_ft.recipes.grpo, dist_ft.learner", ("deepspeed",)) == []


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The dist_ft modules ``path`` imports when it runs (module level or inside a function;
    ``if TYPE_CHECKING:`` blocks excluded), each with the packages above it, whose
    ``__init__`` runs first (but for ``path``'s own packages, which are already running)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(x)
        for n in ast.walk(tree)
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
        for b in n.body
        for x in ast.walk(b)
    }
    named = set()
    for n in ast.walk(tree):
        if id(n) in typing_only:
            continue
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("dist_ft"):
            named |= {f"{n.module}.{a.name}" for a in n.names} | {n.module}
        elif isinstance(n, ast.Import):
            named |= {a.name for a in n.names if a.name.startswith("dist_ft")}
    own = module_name(path).split(".")
    running = {".".join(own[:k]) for k in range(1, len(own))}
    out = set()
    for name in named:
        parts = name.split(".")
        out |= {".".join(parts[:k]) for k in range(2, len(parts) + 1)} & modules - running
    out |= named & modules & running  # an explicit import of a running package: a cycle
    return out


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_in_the_package():
    """Each module's imports (lazy ones too) form a DAG: no module dodges a cycle with an import
    inside a function (models.py <-> peft_methods.py did, before model/ was split)."""
    paths = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: runtime_imports(p, set(paths)) - {m} for m, p in paths.items()}
    done: set[str] = set()

    def visit(m: str, stack: list[str]) -> None:
        if m in stack:
            pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(m) :], m]))
        if m in done:
            return
        for dep in sorted(graph[m]):
            visit(dep, [*stack, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
    assert len(done) == len(paths) > 50


def test_loading_a_config_imports_no_torch():
    """`dist-ft train bad.yaml` answers before torch loads (it takes seconds): the config, its
    schema and every spec type it holds (``model.spec``, ``algos.settings``) are torch-free."""
    code = (
        "from dist_ft.config import load_config\n"
        "load_config(None, ['peft.method=dora', 'algo.objective=dpo', 'dpo.loss=ipo'])"
    )
    assert loaded_by(code, ("torch", "transformers", "peft", "datasets", "deepspeed", "ray")) == []


def test_the_wire_format_and_the_rollout_worker_import_no_datasets():
    """What crosses the wire is torch alone; a rollout worker (wire + generator + rewards) never
    loads ``datasets``, which only the driver's row loading needs."""
    wire = "import dist_ft.wire.batch, dist_ft.wire.packing, dist_ft.wire.prompt"
    assert loaded_by(wire, ("datasets", "transformers")) == []
    assert loaded_by("import dist_ft.rollout.worker", ("datasets",)) == []


def test_unit_test_folders_mirror_the_package():
    """tests/unit/<pkg>/ holds the unit tests of dist_ft/<pkg>/ (and only of a real package)."""
    unit = Path(__file__).resolve().parent
    folders = {p.name for p in unit.iterdir() if p.is_dir() and p.name != "__pycache__"}
    packages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert folders and folders <= packages
