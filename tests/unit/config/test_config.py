import dataclasses
import re
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import pytest
import yaml

from dist_ft.algos.settings import LossType
from dist_ft.config import Config, ConfigError, load_config
from dist_ft.config.loader import _blame
from dist_ft.model.spec import PeftMethod
from dist_ft.ranges import Range

ROOT = Path(__file__).resolve().parents[3]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_precedence_defaults_yaml_overrides(tmp_path):
    p = write(tmp_path, "learner:\n  lr: 0.5\n  zero_stage: 2\ngrpo:\n  loss: dapo\n")
    cfg = load_config(p, ["learner.lr=1e-4", "peft.method=none"])
    assert cfg.learner.lr == 1e-4  # override beats YAML
    assert cfg.learner.zero_stage == 2  # YAML beats default
    assert cfg.grpo.loss is LossType.DAPO
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
    with pytest.raises(ConfigError, match=r"grpo\.loss: expected one of"):
        load_config(None, ["grpo.loss=ppo"])


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


@pytest.mark.parametrize("command", ["train", "sft", "dpo"])
@pytest.mark.parametrize(
    "path",
    sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "bench").glob("*.yaml")]),
    ids=lambda p: p.name,
)
def test_every_shipped_config_validates_for_every_command(path, command):
    """`dist-ft sft` / `dpo` load the recipe with algo.objective set to the command: every
    shipped recipe means the same model, peft, learner and resources under each of them."""
    overrides = [] if command == "train" else [f"algo.objective={command}"]
    shipped = load_config(path)
    grpo_only = "peft.adapters" if shipped.peft.adapters else "env.name" if shipped.env.name else ""
    if command != "train" and grpo_only:
        # several adapters, and environments' episodes, are GRPO's: the other commands refuse,
        # naming the key
        with pytest.raises(ConfigError) as e:
            load_config(path, overrides)
        assert e.value.keys == (grpo_only, "algo.objective")
        return
    cfg = load_config(path, overrides)
    assert isinstance(cfg, Config)
    if command != "train":
        assert cfg.algo.objective == command


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


def numeric_keys(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, type, object]]:
    """(dotted key, int or float, its Range or None) for every numeric key of the schema; a
    list's items are named ``[0]``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        key, tp, rng = prefix + f.name, hints[f.name], None
        if typing.get_origin(tp) is Annotated:
            tp, rng = typing.get_args(tp)[:2]
        if typing.get_origin(tp) is list:
            tp, key = typing.get_args(tp)[0], f"{key}[0]"
        if dataclasses.is_dataclass(tp):
            yield from numeric_keys(tp, f"{key}.")
            continue
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        arms = typing.get_args(tp) if union else (tp,)
        number = next((a for a in arms if a in (int, float)), None)
        if number is not None:
            yield key, number, rng


def test_every_numeric_key_declares_its_range():
    keys = list(numeric_keys())
    assert len(keys) > 40 and "reward.judge.model.tiny.seed" in [k for k, _, _ in keys]
    assert [k for k, _, rng in keys if not isinstance(rng, Range)] == []


def bounds(tp: type, rng: Range) -> tuple[list[object], list[object]]:
    """Values just outside ``rng``, and its inclusive ends."""
    step = 1 if tp is int else 0.5
    out, ends = [], []
    if rng.ge is not None:
        out, ends = [*out, tp(rng.ge - step)], [*ends, tp(rng.ge)]
    if rng.gt is not None:
        out.append(tp(rng.gt))
    if rng.le is not None:
        out, ends = [*out, tp(rng.le + step)], [*ends, tp(rng.le)]
    if rng.lt is not None:
        out.append(tp(rng.lt))
    return out, ends


@pytest.mark.parametrize(
    ("key", "tp", "rng"), [k for k in numeric_keys() if "[" not in k[0]], ids=lambda v: str(v)
)
def test_each_range_is_enforced_at_load(key, tp, rng):
    # a method-specific peft key is refused under a method that ignores it: pick one that reads it
    method = {"peft.num_virtual_tokens": ["peft.method=prefix"]}.get(key, [])
    outside, ends = bounds(tp, rng)
    for v in outside:
        with pytest.raises(ConfigError, match=re.escape(f"{key}={v}: must be {rng}")):
            load_config(None, [*method, f"{key}={v}"])
    for v in ends:
        assert load_config(None, [*method, f"{key}={v}"])  # a closed range's ends are valid
    if tp is float:
        with pytest.raises(ConfigError, match=re.escape(f"{key}=nan: must be finite")):
            load_config(None, [*method, f"{key}=.nan"])


def test_range_messages_read_as_intervals():
    assert str(Range(gt=0)) == "> 0"
    assert str(Range(ge=0, lt=1)) == "in [0, 1)"
    assert str(Range(gt=0, le=1)) == "in (0, 1]"
    assert str(Range(ge=2, why="advantages are group-relative")) == (
        ">= 2 (advantages are group-relative)"
    )


def test_cross_field_rules_run_after_ranges():
    # learners=0 once divided by zero in Config.__post_init__
    for setting in ("resources.learners=0", "learner.micro_batches=0"):
        with pytest.raises(ConfigError, match=re.escape(f"{setting}: must be >= 1")):
            load_config(None, [setting])


def test_errors_blame_the_source_that_set_the_value(tmp_path):
    p = write(tmp_path, "rollout:\n  temperature: 0.7\nlearner:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}: learner\.lr=-1: must be > 0$"):
        load_config(p)
    with pytest.raises(
        ConfigError, match=r"^command-line override 'rollout\.temperature=0': rollout\.temp"
    ):
        load_config(p, ["learner.lr=0.1", "rollout.temperature=0"])
    # an override of a whole section takes over the blame for every key in it
    with pytest.raises(ConfigError, match=r"^command-line override 'learner=\{lr: 0\}': learner"):
        load_config(p, ["learner={lr: 0}"])
    # a cross-field rule names each source that set one of its keys
    p = write(tmp_path, "grpo:\n  sft_warmup_steps: 5\n")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(p))} and command-line override 'data\.source=x"
    ):
        load_config(p, ["data.source=x.jsonl"])


def test_blame_skips_defaults_when_the_user_set_a_key():
    sources = {"data.source": "c.yaml", "reward.functions": "command-line override 'r'"}
    assert _blame(["grpo.sft_warmup_steps", "data.source"], sources) == "c.yaml"
    assert _blame(["reward.functions[0].name"], sources) == "command-line override 'r'"
    assert _blame(["run.steps"], sources) == "defaults"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_config_file_is_refused(tmp_path, text):
    with pytest.raises(ConfigError, match=r"is empty .*`dist-ft demo`"):
        load_config(write(tmp_path, text))


def test_config_path_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=rf"config path {re.escape(str(tmp_path))} is a dir"):
        load_config(tmp_path)


def test_a_key_that_moved_to_its_objectives_section_names_the_new_key(tmp_path):
    p = write(tmp_path, "algo:\n  loss: dapo\n")
    with pytest.raises(ConfigError, match=r"'algo\.loss' is now 'grpo\.loss'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"'algo\.beta' is now 'grpo\.beta'"):
        load_config(None, ["algo.beta=0.1"])
    assert load_config(None, ["grpo.beta=0.1"]).grpo.beta == 0.1


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("peft.method=dora", "peft.method"),
        ("peft.modules_to_save=[lm_head]", "peft.modules_to_save"),
        ("grpo.beta=0.1", "grpo.beta"),
    ],
)
def test_vllm_refuses_what_it_cannot_serve_at_load(setting, key):
    # at config load, before any model (or vLLM) loads: the method or key, and the engine
    with pytest.raises(
        ConfigError, match=rf"{re.escape(setting.split('[')[0])}.*rollout\.generator=vllm"
    ) as e:
        load_config(None, ["rollout.generator=vllm", setting])
    assert e.value.keys == ("rollout.generator", key)
    assert load_config(None, ["rollout.generator=vllm", "peft.method=none"])


def test_the_behaviour_policy_keys_reach_the_loss():
    from dist_ft.run.specs import loss_params

    params = loss_params(load_config(None, ["algo.behaviour_logprobs=learner", "algo.tis_cap=2"]))
    assert (params.behaviour, params.tis_cap) == ("learner", 2.0)
    assert (
        loss_params(load_config(None, [])).behaviour,
        loss_params(load_config(None, [])).tis_cap,
    ) == ("engine", None)


def test_fleet_bounds_need_an_elastic_fleet_and_an_order():
    with pytest.raises(ConfigError, match=r"set resources.rollout_workers=auto \(it is 2\)") as e:
        load_config(None, ["resources.rollout_workers=2", "resources.min_rollout_workers=2"])
    assert e.value.keys[0] == "resources.rollout_workers"
    with pytest.raises(ConfigError, match=r"max_rollout_workers=1 is below"):
        load_config(
            None,
            [
                "resources.rollout_workers=auto",
                "resources.min_rollout_workers=2",
                "resources.max_rollout_workers=1",
            ],
        )
    cfg = load_config(None, ["resources.rollout_workers=auto", "resources.max_rollout_workers=3"])
    assert cfg.resources.max_rollout_workers == 3


def test_max_rollout_workers_caps_an_auto_fleet_at_start():
    from dist_ft.cluster.placement import ActorSpec, plan_actors

    nodes = [
        {"Resources": {"CPU": 8.0, "rollout": 4.0}},
        {"Resources": {"CPU": 8.0, "rollout": 2.0}},
    ]
    assert len(plan_actors(ActorSpec("auto", 1), nodes).of("rollout")) == 6
    capped = ActorSpec("auto", 1, max_rollout_workers=3)
    assert len(plan_actors(capped, nodes).of("rollout")) == 3
    assert len(plan_actors(ActorSpec(5, 1, max_rollout_workers=3), nodes).of("rollout")) == 5


def test_the_collective_transport_is_refused_with_async_rollouts():
    with pytest.raises(ConfigError, match=r"collective .*grpo\.max_staleness=1") as e:
        load_config(None, ["resources.weight_transport=collective", "grpo.max_staleness=1"])
    assert e.value.keys == ("resources.weight_transport", "grpo.max_staleness")
    assert load_config(None, ["resources.weight_transport=collective"])
