"""Several LoRA adapters on one base (peft.adapters), in debug mode with real DeepSpeed: each
task's prompts are generated and trained with its own adapter, a step moves that adapter alone,
and a sync carries the adapters that changed, fingerprinted."""

import json
from pathlib import Path

import pytest
import torch
from support import build

from dist_ft.cluster import LocalCluster
from dist_ft.config import ConfigError, load_config
from dist_ft.model.loading import load_tokenizer, resolve_model_path
from dist_ft.recipes.grpo import train
from dist_ft.run.samplers import load_prompts
from dist_ft.sync import fingerprint

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = "peft.adapters={repeat: [repeat], next: [next]}"


def adapter_state(learner, adapter):
    """``adapter``'s tensors as the learner exports them (gathered under ZeRO-3)."""
    state = learner.export_weights()
    return {k: v for k, v in state.items() if k.startswith(f"{adapter}/")}


def moved(before, learner, adapter):
    """How many of ``adapter``'s tensors differ from ``before``."""
    after = adapter_state(learner, adapter)
    assert after.keys() == before.keys()
    return sum(not torch.equal(before[k], after[k]) for k in before)


def base_weights(learner):
    state = learner.export_weights(adapter_only=False)
    return {k: v for k, v in state.items() if "lora_" not in k}


@pytest.mark.parametrize("stage", [0, 3])
def test_each_step_trains_its_adapter_alone_and_syncs_it(tiny_path, stage):
    cfg, wk, lk = build(
        tiny_path,
        "data.source=demo_mix",
        ADAPTERS,
        "algo.prompts_per_step=4",
        f"learner.zero_stage={stage}",
        "learner.lr=0.01",
    )
    prompts = load_prompts(cfg, load_tokenizer(tiny_path)).prompts
    of = {task: [p for p in prompts if p.task == task][:4] for task in ("repeat", "next")}
    cluster = LocalCluster(wk, lk)
    learner, worker = cluster.learner, cluster.workers[0]
    nbytes = {a: sum(t.nbytes for t in adapter_state(learner, a).values()) for a in of}
    assert nbytes["repeat"] == nbytes["next"] > 0
    first = cluster.sync_weights()  # both adapters: the workers' random A differs at load
    assert first.nbytes == 2 * nbytes["repeat"]
    base = base_weights(learner)

    for step, (index, name) in enumerate([(0, "repeat"), (1, "next")] * 2, start=1):
        other = "next" if name == "repeat" else "repeat"
        batch = cluster.collect(cluster.submit_rollout(step, of[name]))
        assert batch.adapter_ids.tolist() == [index] * len(batch)
        batch.advantages = torch.linspace(-1.5, 1.5, len(batch))  # a gradient every step
        mine, theirs = adapter_state(learner, name), adapter_state(learner, other)
        metrics = cluster.train_step(batch, cfg.algo.objective)
        # LoRA's B starts at 0, so A moves from the adapter's second step on
        assert moved(mine, learner, name) == (len(mine) if step > 2 else len(mine) // 2)
        assert moved(theirs, learner, other) == 0
        # generated with the adapter the learner trained: on-policy ratio 1, also once the
        # two adapters differ (steps 3 and 4)
        assert abs(metrics["ratio"] - 1) < 1e-5
        sync = cluster.sync_weights()  # checks the worker's read-back fingerprint itself
        assert sync.nbytes == nbytes[name]
        sent = learner.export_weights()
        assert worker.fingerprint() == fingerprint(sent)
    after = base_weights(learner)
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base)


def test_adapters_are_refused_before_any_model_loads(tmp_path):
    def refused(*overrides):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        with pytest.raises(ConfigError) as e:
            train(load_config(None, ["run.wandb=disabled", *overrides, f"run.output_dir={out}"]))
        return str(e.value), e.value.keys

    msg, keys = refused("peft.method=vera", ADAPTERS)
    assert "peft.adapters" in msg and "vera" in msg and keys == ("peft.adapters", "peft.method")
    msg, keys = refused("peft.adapters={a: [repeat], b: [repeat, next]}")
    assert "'repeat' is already adapter 'a'" in msg and "peft.adapters.b" in keys
    msg, keys = refused("algo.objective=sft", ADAPTERS)
    assert keys == ("peft.adapters", "algo.objective")
    # the data's tasks against the adapters', checked after the rows load, before the model
    msg, keys = refused("data.source=demo_mix", "peft.adapters={repeat: [repeat]}")
    assert "['next'] belong to no adapter" in msg and keys == ("peft.adapters", "data.source")
    msg, keys = refused("data.source=demo_mix", "peft.adapters={a: [repeat, next], b: [qa]}")
    assert "peft.adapters.b names tasks ['qa']" in msg
    assert not any(tmp_path.rglob("adapter_model.safetensors"))


def test_a_run_with_two_adapters_exports_and_merges_each(tmp_path, capsys):
    """A finished peft.adapters run keeps adapter/<name>/, each a plain peft adapter: export
    names one (--name), and merge takes two of them as any adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dist_ft.cli import main

    run = tmp_path / "run"
    overrides = ["run.wandb=disabled", "run.steps=2", f"run.output_dir={run}"]
    train(
        load_config(
            ROOT / "configs" / "adapters_demo.yaml", [*overrides, "grpo.sft_warmup_steps=1"]
        )
    )
    assert sorted(p.name for p in (run / "adapter").iterdir() if p.is_dir()) == ["next", "repeat"]

    assert main(["export", str(run), "--merge", str(tmp_path / "m")]) == 2
    assert "trained adapters ['repeat', 'next'] (peft.adapters): name one with --name" in (
        capsys.readouterr().err
    )
    assert main(["export", str(run), "--name", "next", "--merge", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # no dist_ft import needed
    cfg = load_config(run / "config.yaml")
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny", cfg.model.tiny))
    policy = PeftModel.from_pretrained(base, run / "adapter" / "next")
    ids = torch.tensor([[3, 9, 12, 5, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, policy(ids).logits, atol=1e-5, rtol=0)

    pair = [str(run / "adapter" / a) for a in ("repeat", "next")]
    assert main(["merge", *pair, str(tmp_path / "both"), "--weights", "0.5,0.5"]) == 0
    assert (tmp_path / "both" / "adapter_model.safetensors").is_file()


def test_a_resumed_adapters_run_continues_the_turns_exactly(tmp_path):
    """Stopped after step 2 and resumed to step 4, a peft.adapters run trains what an
    uninterrupted one does: the same adapter each step (the sampler's turn is checkpointed),
    the same losses, the same final adapters to the bit."""
    from safetensors.torch import load_file

    def run(out, steps, *extra):
        overrides = [
            "run.wandb=disabled",
            f"run.output_dir={out}",
            f"run.steps={steps}",
            "run.checkpoint_every=1",
            "run.deterministic=true",
            "grpo.sft_warmup_steps=0",
            "algo.prompts_per_step=4",
            *extra,
        ]
        train(load_config(ROOT / "configs" / "adapters_demo.yaml", overrides))

    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    run(ref, 4)
    run(resumed, 2)
    run(resumed, 4, "run.resume=auto")

    def rows(out, name):
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    turns = [r["adapter"] for r in rows(resumed, "ledger.jsonl")]
    assert turns == [["repeat"], ["next"], ["repeat"], ["next"]]
    assert turns == [r["adapter"] for r in rows(ref, "ledger.jsonl")]
    assert [r["loss"] for r in rows(resumed, "metrics.jsonl")] == [
        r["loss"] for r in rows(ref, "metrics.jsonl")
    ]
    for name in ("repeat", "next"):
        a = load_file(ref / "adapter" / name / "adapter_model.safetensors")
        b = load_file(resumed / "adapter" / name / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
