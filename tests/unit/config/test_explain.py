"""`dist-ft explain`: every config key documented in the schema, printed with type, range and
default (issue 21)."""

import subprocess
import sys

import pytest

from dist_ft.config import ConfigError
from dist_ft.config.explain import explain, leaves


def test_every_config_key_and_section_has_a_docstring():
    undocumented = [key for key, _, _, doc in leaves() if not doc]
    assert undocumented == []
    assert len(leaves()) > 100


def test_explain_prints_a_keys_docstring_type_range_and_default():
    r = subprocess.run(
        [sys.executable, "-m", "dist_ft.cli", "explain", "rollout.group_size"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "rollout.group_size: int, >= 2 (advantages are group-relative) = 8",
        "    G completions per prompt",
    ]


def test_a_section_lists_its_keys_and_an_unknown_key_names_the_close_ones():
    text = explain("dpo")
    assert text.splitlines()[0] == "dpo  (section)"
    assert "dpo.loss: one of 'sigmoid', 'ipo', 'simpo' = 'sigmoid'" in text
    with pytest.raises(ConfigError, match=r"did you mean rollout\.group_size"):
        explain("rollout.grup_size")
