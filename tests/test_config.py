import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_ft.algos.grpo import LossType
from dist_ft.config import Config, ConfigError, PeftMethod, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_precedence_defaults_yaml_overrides(tmp_path):
    p = write(tmp_path, "learner:\n  lr: 0.5\n  zero_stage: 2\nalgo:\n  loss: dapo\n")
    cfg = load_config(p, ["learner.lr=1e-4", "peft.method=none"])
    assert cfg.learner.lr == 1e-4  # override beats YAML
    assert cfg.learner.zero_stage == 2  # YAML beats default
    assert cfg.algo.loss is LossType.DAPO
    assert cfg.peft.method is PeftMethod.NONE
    assert cfg.rollout.group_size == Config().rollout.group_size  # default kept


def test_unknown_key_names_key_and_suggests(tmp_path):
    p = write(tmp_path, "learner:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'learner\.lrr'.*'learner\.lr'"):
        load_config(p)


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"'rollouts'.*did you mean 'rollout'"):
        load_config(None, ["rollouts.group_size=4"])


def test_wrong_type_names_key_and_type(tmp_path):
    p = write(tmp_path, "rollout:\n  group_size: four\n")
    with pytest.raises(ConfigError, match=r"rollout\.group_size: expected int, got str"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"run\.plot: expected bool"):
        load_config(None, ["run.plot=3"])
    with pytest.raises(ConfigError, match=r"algo\.loss: expected one of"):
        load_config(None, ["algo.loss=ppo"])


def test_file_is_named_in_errors(tmp_path):
    p = write(tmp_path, "learner:\n  lr: [1]\n")
    with pytest.raises(ConfigError, match=str(p)):
        load_config(p)


def test_list_of_reward_sections_is_typed(tmp_path):
    p = write(tmp_path, "reward:\n  functions:\n    - name: exact_match\n      weightt: 1\n")
    with pytest.raises(ConfigError, match=r"reward\.functions\[0\]\.weightt"):
        load_config(p)


def test_batch_sizes_are_derived():
    cfg = load_config(
        None,
        [
            "algo.prompts_per_step=4",
            "rollout.group_size=8",
            "resources.learners=2",
            "learner.micro_batches=2",
        ],
    )
    assert cfg.samples_per_step == 32 and cfg.micro_batch_size == 8
    with pytest.raises(ConfigError, match="split evenly"):
        load_config(
            None, ["algo.prompts_per_step=3", "rollout.group_size=3", "resources.learners=2"]
        )


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.learner.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_print_config_round_trips(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_ft.cli",
            "train",
            str(ROOT / "configs" / "demo.yaml"),
            "learner.lr=0.25",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    printed = yaml.safe_load(out)
    assert printed["learner"]["lr"] == 0.25
    # what --print-config shows loads back to the same config
    p = write(tmp_path, out)
    assert load_config(p) == load_config(ROOT / "configs" / "demo.yaml", ["learner.lr=0.25"])


def test_cli_reports_bad_key_with_exit_code_2():
    r = subprocess.run(
        [sys.executable, "-m", "dist_ft.cli", "demo", "learner.lrr=1"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "unknown config key 'learner.lrr'" in r.stderr


def test_demo_yaml_is_the_built_in_default():
    assert load_config(ROOT / "configs" / "demo.yaml") == Config()
