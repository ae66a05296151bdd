"""Offline checks of launch/ and cluster/: no Kubernetes, Slurm or Ray cluster needed.

The KubeRay manifests are validated against the real CRD schemas, vendored unchanged in
tests/data/kuberay-crds/ (see its README for the source commit and licence), so the check runs in
every plain clone. Unknown fields are rejected, as `kubectl apply`
does by default (strict field validation), so a misspelled key fails here and not on a cluster.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "tests" / "data" / "kuberay-crds"
RAYJOB = REPO / "cluster" / "kuberay-rayjob.yaml"
RAYCLUSTER = REPO / "cluster" / "kuberay-raycluster.yaml"
RAY_SUBMIT = REPO / "launch" / "ray_submit.sh"
SBATCH = REPO / "launch" / "slurm" / "dist_ft.sbatch"
LAUNCHER_YAML = REPO / "cluster" / "ray-cluster.yaml"

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-1.4 MB of YAML


def _load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=Loader)


def _strict(node: Any) -> Any:
    """Drop x-kubernetes-* extensions and close every object that lists its properties."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":  # keys here are field names, not schema keywords
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        else:
            out[key] = _strict(value)
    # The API server prunes or rejects fields a structural schema does not list, unless the
    # schema opts out with preserve-unknown-fields; jsonschema would silently accept them.
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd(filename: str) -> tuple[jsonschema.Draft7Validator, str, str]:
    """(validator, apiVersion, kind) for the storage version of one CRD."""
    crd = _load(CRD_DIR / filename)
    versions = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    assert len(versions) == 1, f"{filename}: expected one served storage version"
    schema = _strict(versions[0]["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    api_version = f"{crd['spec']['group']}/{versions[0]['name']}"
    return jsonschema.Draft7Validator(schema), api_version, crd["spec"]["names"]["kind"]


def _crd_errors(manifest: dict[str, Any], crd_file: str) -> list[str]:
    validator, api_version, kind = _crd(crd_file)
    errors = []
    if manifest.get("apiVersion") != api_version:
        errors.append(f"apiVersion {manifest.get('apiVersion')!r} != {api_version!r}")
    if manifest.get("kind") != kind:
        errors.append(f"kind {manifest.get('kind')!r} != {kind!r}")
    for err in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in err.absolute_path) or "<root>"
        errors.append(f"{path}: {err.message}")
    return errors


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


MANIFESTS = [
    pytest.param(RAYJOB, "ray.io_rayjobs.yaml", id="rayjob"),
    pytest.param(RAYCLUSTER, "ray.io_rayclusters.yaml", id="raycluster"),
]


# --- KubeRay manifests against the CRD schemas ------------------------------------------------


@pytest.mark.parametrize(("path", "crd_file"), MANIFESTS)
def test_manifest_matches_crd(path: Path, crd_file: str) -> None:
    errors = _crd_errors(_load(path), crd_file)
    assert not errors, f"{path.name} does not match {crd_file}:\n" + "\n".join(errors)


def _head_to_string(m: dict[str, Any]) -> None:
    m["spec"]["rayClusterSpec"]["headGroupSpec"] = "ray-head"


def _int_start_param(m: dict[str, Any]) -> None:
    m["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 1


def _misspelled_field(m: dict[str, Any]) -> None:
    spec = m["spec"]["rayClusterSpec"]
    spec["workerGroupSpec"] = spec.pop("workerGroupSpecs")


def _no_group_name(m: dict[str, Any]) -> None:
    del m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_head_to_string, "headGroupSpec: 'ray-head' is not of type 'object'"),
        (_int_start_param, "rayStartParams.num-cpus: 1 is not of type 'string'"),
        (_misspelled_field, "'workerGroupSpec' was unexpected"),
        (_no_group_name, "'groupName' is a required property"),
    ],
)
def test_validator_rejects_broken_rayjob(breakage: Any, expected: str) -> None:
    manifest = copy.deepcopy(_load(RAYJOB))
    breakage(manifest)
    errors = _crd_errors(manifest, "ray.io_rayjobs.yaml")
    assert any(expected in e for e in errors), f"expected {expected!r} among {errors}"


# --- What the schema cannot say ---------------------------------------------------------------


def test_rayjob_entrypoint_runs_a_shipped_config() -> None:
    argv = shlex.split(_load(RAYJOB)["spec"]["entrypoint"])
    assert argv[:2] == ["dist-ft", "train"], argv
    assert argv[2].startswith("configs/"), argv
    # The image copies configs/ to its WORKDIR, and the entrypoint runs from there.
    assert (REPO / argv[2]).is_file(), f"entrypoint names {argv[2]}, which is not in the repo"
    assert "resources.mode=ray" in argv[3:]
    assert "resources.ray_address=auto" in argv[3:]


def test_raycluster_dashboard_is_loopback_only() -> None:
    head = _cluster_spec(_load(RAYCLUSTER))["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host") == "127.0.0.1"


def test_rayjob_dashboard_is_reachable_by_the_operator_but_token_protected() -> None:
    # KubeRay's submitter pod and the operator reach the dashboard through the head Service;
    # on loopback the job is never submitted. So the RayJob protects it with a token instead.
    spec = _cluster_spec(_load(RAYJOB))
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") != "127.0.0.1"
    assert spec.get("authOptions", {}).get("mode") == "token"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER], ids=["rayjob", "raycluster"])
def test_groups_pass_kuberay_operator_rules(path: Path) -> None:
    spec = _cluster_spec(_load(path))
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    ray_start_resource_keys = {"num-cpus", "num-gpus", "memory", "resources"}
    for group in groups:
        assert group["template"]["spec"]["containers"], "KubeRay needs a container per group"
        params = group.get("rayStartParams", {})
        # The operator refuses a group that sets resources both ways.
        assert not (ray_start_resource_keys & params.keys() and group.get("resources")), group
        assert "labels" not in params, "use the group's top-level labels field"
    if spec.get("authOptions", {}).get("mode") == "token":
        assert _version(spec["rayVersion"]) >= (2, 52), "token auth needs Ray >= 2.52"


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER], ids=["rayjob", "raycluster"])
def test_a_worker_group_advertises_rollout(path: Path) -> None:
    advertised = {}
    for group in _cluster_spec(_load(path))["workerGroupSpecs"]:
        raw = group.get("rayStartParams", {}).get("resources")
        if raw is None:
            continue
        # KubeRay writes `--resources=<raw>` into a shell command; undo the shell's quoting.
        words = shlex.split(raw)
        assert len(words) == 1, f"{raw!r} splits in the shell; wrap the JSON in double quotes"
        (unquoted,) = words
        advertised[group["groupName"]] = json.loads(unquoted)
    assert any(r.get("rollout", 0) > 0 for r in advertised.values()), advertised


def test_rayjob_and_raycluster_define_the_same_groups() -> None:
    job, cluster = _cluster_spec(_load(RAYJOB)), _cluster_spec(_load(RAYCLUSTER))
    assert job["rayVersion"] == cluster["rayVersion"]
    assert job["workerGroupSpecs"] == cluster["workerGroupSpecs"]
    assert job["headGroupSpec"]["template"] == cluster["headGroupSpec"]["template"]
    params = [dict(s["headGroupSpec"]["rayStartParams"]) for s in (job, cluster)]
    for p in params:
        p.pop("dashboard-host", None)  # differs on purpose, see the tests above
    assert params[0] == params[1]


# --- Ray cluster launcher YAML ----------------------------------------------------------------


def test_ray_cluster_yaml_passes_ray_up_validation() -> None:
    # The same two steps `ray up` runs before touching any machine.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load(LAUNCHER_YAML)))


def test_ray_cluster_yaml_keeps_dashboard_local_and_workers_rollout() -> None:
    config = _load(LAUNCHER_YAML)
    head = " ".join(config["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", head), head
    worker = " ".join(config["worker_start_ray_commands"])
    match = re.search(r"--resources[= ]('[^']*')", worker)
    assert match, worker
    assert json.loads(shlex.split(match.group(1))[0]).get("rollout", 0) > 0


# --- Launch scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", [RAY_SUBMIT, SBATCH], ids=["ray_submit", "sbatch"])
def test_script_parses(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", [RAY_SUBMIT, SBATCH], ids=["ray_submit", "sbatch"])
def test_script_passes_shellcheck(script: Path) -> None:
    result = subprocess.run(
        ["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


def test_ray_submit_help() -> None:
    result = subprocess.run(
        ["bash", str(RAY_SUBMIT), "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert "Usage: launch/ray_submit.sh" in result.stdout


def _run_ray_submit(tmp_path: Path, args: list[str], env: dict[str, str]) -> tuple[list[str], str]:
    """Run a copy of ray_submit.sh in a throwaway repo with a fake `ray` that records its argv."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "configs").mkdir()
    (repo / "configs" / "tiny.yaml").write_text("run: {}\n")
    shutil.copy2(RAY_SUBMIT, repo / "launch" / "ray_submit.sh")
    # with the output-dir check it runs before submitting to a cluster on this machine
    shutil.copytree(RAY_SUBMIT.parent / "slurm", repo / "launch" / "slurm")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv_file = tmp_path / "argv.json"
    fake_ray = bin_dir / "ray"
    fake_ray.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(argv_file)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    fake_ray.chmod(0o755)
    # the fake ray first; then this venv's dist-ft, which the script runs to check the config
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    base_env = {"PATH": path, "HOME": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(repo / "launch" / "ray_submit.sh"), *args],
        cwd=tmp_path,  # not the repo root: the script must find it by itself
        env=base_env | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(argv_file.read_text()), result.stdout + result.stderr


def test_ray_submit_builds_the_job_command(tmp_path: Path) -> None:
    secret = "wandb-secret-0123456789"
    argv, output = _run_ray_submit(
        tmp_path,
        ["--no-wait", "configs/tiny.yaml", "run.output_dir=/tmp/x", "run.name=with space"],
        {"WANDB_API_KEY": secret},
    )
    assert argv[:2] == ["job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"
    assert argv[argv.index("--working-dir") + 1] == "."
    assert "--no-wait" in argv
    entry = argv[argv.index("--") + 1 :]
    assert entry == [
        "dist-ft", "train", "configs/tiny.yaml", "resources.mode=ray",
        "resources.ray_address=auto", "run.output_dir=/tmp/x", "run.name=with space",
    ]  # fmt: skip
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert {".venv", ".git", "runs", "wandb", "__pycache__"} <= set(runtime_env["excludes"])
    assert runtime_env["env_vars"] == {"WANDB_MODE": "offline"}
    assert secret not in json.dumps(argv)
    assert secret not in output


def test_ray_submit_forwards_ds_accelerator_and_address(tmp_path: Path) -> None:
    argv, _ = _run_ray_submit(
        tmp_path,
        # a cluster elsewhere: a relative run.output_dir would vanish with the job's copy
        ["configs/tiny.yaml", "run.output_dir=/tmp/y"],
        {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "RAY_ADDRESS": "http://h:8265"},
    )
    assert argv[argv.index("--address") + 1] == "http://h:8265"
    assert "--no-wait" not in argv
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"] == {"WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
