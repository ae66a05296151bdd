"""Every ``peft.method`` through real DeepSpeed learners (world size 1, gloo) and real rollout
workers on the tiny model: what trains, what syncs, what a worker holds after a sync, what the
saved artefact reloads to, and what the KL reference is."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from support import assert_adam_close, build, load_learner_weights

from dist_ft.config import ConfigError, load_config
from dist_ft.data import encode_pairs
from dist_ft.learner import Learner
from dist_ft.model.loading import load_policy, load_tokenizer
from dist_ft.model.logprobs import completion_logprobs
from dist_ft.model.spec import CONFIG_FILE, PeftMethod, PeftSpec
from dist_ft.model.weights import load_artefact
from dist_ft.rollout import RolloutWorker
from dist_ft.sync import fingerprint
from dist_ft.tasks import demo_rows
from dist_ft.wire.batch import ScoredBatch

METHODS = [m.value for m in PeftMethod]
CPU = torch.device("cpu")
SMALL = ("algo.prompts_per_step=2", "rollout.group_size=4")  # 8 samples a step


def rollout(worker, prompts):
    """A real rollout of 2 prompts x G=4, advantages set to +-1 so every step has a gradient."""
    batch = worker.rollout(1, prompts[:2], seed=0)
    batch.advantages = torch.tensor([1.0, -1.0]).repeat(len(batch) // 2)
    return batch


def tensors(module, trainable):
    """Parameters (and, for the frozen side, buffers such as VeRA's shared random matrices)."""
    params = module.named_parameters()
    out = {n: p.detach().clone() for n, p in params if p.requires_grad == trainable}
    if not trainable:
        out |= {f"buffer:{n}": b.detach().clone() for n, b in module.named_buffers()}
    return out


def sync_name(param_name):
    """A trainable parameter's name in a sync: peft drops its adapter name (``default``), sends
    DoRA's magnitude without ``.weight`` and prefix tuning's prompt encoder as
    ``prompt_embeddings``."""
    if param_name == "prompt_encoder.default.embedding.weight":
        return "prompt_embeddings"
    name = param_name.replace(".default", "")
    return name.removesuffix(".weight") if "lora_magnitude_vector" in name else name


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_syncs_and_reloads(tiny_path, demo_prompts, tmp_path, method):
    _, wk, lk = build(tiny_path, *SMALL, f"peft.method={method}")
    learner = Learner(lk)
    worker = RolloutWorker(wk)
    load_learner_weights(worker, learner)  # the trainer's first sync: start from the learner
    batch = rollout(worker, demo_prompts)
    trainable0, frozen0 = tensors(learner.module, True), tensors(learner.module, False)
    assert trainable0

    # two GRPO steps change every trainable tensor and no frozen one (LoRA's B, VeRA's
    # lambda_b and the adapters' up start at 0: their partners move from the second step)
    metrics = learner.step(batch)
    assert abs(metrics["ratio"] - 1.0) < 1e-5  # the worker sampled what the learner computes
    learner.step(batch)
    trainable, frozen = tensors(learner.module, True), tensors(learner.module, False)
    assert [n for n in trainable0 if torch.equal(trainable[n], trainable0[n])] == []
    assert [n for n in frozen0 if not torch.equal(frozen[n], frozen0[n])] == []

    # the sync carries exactly the trainable tensors: their names, their bytes
    sent = learner.export_weights()
    assert set(sent) == {sync_name(n) for n in trainable}
    for name, t in trainable.items():
        assert sent[sync_name(name)].dtype == t.dtype
        assert torch.equal(sent[sync_name(name)], t)
    assert sum(t.nbytes for t in sent.values()) == sum(t.nbytes for t in trainable.values())

    # a worker built with the same method holds, after the sync, what the learner sent
    assert load_learner_weights(worker, learner) == fingerprint(sent)

    # the saved artefact reloads into a fresh policy and gives the learner's logits
    learner.save_pretrained(tmp_path)
    if method == "none":  # full fine-tuning saves a whole HF model
        fresh = load_policy(str(tmp_path), "float32", PeftSpec(method=PeftMethod.NONE), CPU)
    else:
        spec = lk.peft
        if (tmp_path / CONFIG_FILE).exists():  # bitfit, adapter: the json rebuilds the spec
            saved = json.loads((tmp_path / CONFIG_FILE).read_text())["peft"]
            spec = PeftSpec(**{**saved, "method": PeftMethod(saved["method"])})
            assert spec == lk.peft
        fresh = load_policy(tiny_path, "float32", spec, CPU)
        load_artefact(fresh, tmp_path)
    ids = batch.prompt_ids[:2]
    expected = logits(learner.module, ids)
    torch.testing.assert_close(logits(fresh, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_with_sft_on_packed_rows(tiny_path, method):
    """SFT on the same learners: short and long demonstrations share packed rows (prefix tuning
    keeps the padded forward: peft's prefix code takes no 4D mask); two steps move every
    trainable tensor and no frozen one."""
    _, _, lk = build(tiny_path, f"peft.method={method}")
    learner = Learner(lk)
    assert learner.pack == (method != "prefix")
    rows = demo_rows(8, seed=0)
    targets = [r["answer"][0] * (1 if i % 2 else 12) for i, r in enumerate(rows)]
    pairs = encode_pairs(load_tokenizer(tiny_path), [r["prompt"] for r in rows], targets)
    batch = ScoredBatch.supervised(*pairs)
    trainable0, frozen0 = tensors(learner.module, True), tensors(learner.module, False)
    for _ in range(2):
        assert learner.step(batch, "sft")["loss"] > 0
    trainable, frozen = tensors(learner.module, True), tensors(learner.module, False)
    assert [n for n in trainable0 if torch.equal(trainable[n], trainable0[n])] == []
    assert [n for n in frozen0 if not torch.equal(frozen[n], frozen0[n])] == []


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_zero_stage_matches_zero0(tiny_path, demo_prompts, method, stage):
    """Every method trains under ZeRO-1, 2 and 3 (which really partitions) to the weights
    ZeRO-0 reaches: none is refused on CPU (QLoRA under ZeRO-3 included)."""
    _, wk, lk = build(tiny_path, *SMALL, f"peft.method={method}")
    worker = RolloutWorker(wk)
    out = {}
    for s in (0, stage):
        learner = Learner(replace(lk, zero_stage=s))
        if s == 0:
            load_learner_weights(worker, learner)
            batch = rollout(worker, demo_prompts)
        if s == 3:
            assert all(p.numel() == 0 for p in learner.module.parameters() if p.requires_grad)
        learner.step(batch)
        learner.step(batch)
        out[s] = learner.export_weights()
    assert out[stage].keys() == out[0].keys()
    for name in out[0]:
        assert_adam_close(out[stage][name], out[0][name], lk.lr, name)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_reference_logprobs_are_the_start_without_a_second_model(tiny_path, demo_prompts, method):
    """``grpo.beta > 0``: the worker computes reference logprobs from its own policy set back to
    its start (peft's disable_adapter, the bottleneck adapters switched off, BitFit's starting
    biases swapped in), and the policy is its trained self again afterwards."""
    _, wk, _ = build(tiny_path, *SMALL, "grpo.beta=0.05", f"peft.method={method}")
    worker = RolloutWorker(wk)
    model = worker.generator.model
    assert worker.generator.ref_model is None
    torch.manual_seed(0)
    with torch.no_grad():  # move the trainable set away from its start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    trained = tensors(model, True)
    batch = worker.rollout(1, demo_prompts[:2], seed=0)
    start = load_policy(tiny_path, wk.generation.dtype, wk.generation.peft, CPU).eval()
    if method == "prefix":  # a random prefix is no identity: the reference is the base without it
        start = start.get_base_model()
    with torch.no_grad():
        expected = completion_logprobs(
            start, *batch.sample_prompts(), batch.episode_ids, batch.attention_mask
        )
    m = batch.trainable_mask
    torch.testing.assert_close(batch.ref_logprobs[m], expected[m], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch.logprobs[m], batch.ref_logprobs[m], atol=1e-3)
    after = tensors(model, True)
    assert after.keys() == trained.keys()  # what trains (and syncs) is still what trained
    assert all(torch.equal(p, trained[n]) for n, p in after.items())


def test_qlora_adapter_trains_on_a_step_that_follows_generation(tiny_path, demo_prompts):
    """ENV-NOTES' trap: on CPUs with AVX512-BF16, one eval-mode forward repacks bitsandbytes'
    4-bit weights into an inference-only layout. Generation on the learner's own model
    (eval, no grad) must leave them trainable, and the next steps must move every adapter
    tensor."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    _, wk, lk = build(tiny_path, *SMALL, "peft.method=qlora")
    learner = Learner(lk)
    worker = RolloutWorker(wk)
    load_learner_weights(worker, learner)
    batch = rollout(worker, demo_prompts)
    module = learner.module
    module.eval()
    with torch.no_grad():
        ids = batch.prompt_ids[:2]
        module.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
        )
    layers = [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    before = tensors(module, True)
    learner.step(batch)
    learner.step(batch)
    assert [n for n, p in tensors(module, True).items() if torch.equal(p, before[n])] == []
    if has_avx512bf16():  # the hazard is real here: bitsandbytes' default repacks on eval
        probe = load_policy(tiny_path, "float32", lk.peft, CPU).eval()
        layer = next(m for m in probe.modules() if isinstance(m, bnb.nn.Linear4bit))
        layer.support_avx512bf16_for_cpu = True
        with torch.no_grad():
            layer(torch.zeros(1, layer.in_features))
        assert layer.weight.quant_state.packing_format_for_cpu


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["peft.method=ia3", "peft.dropout=0.1"], "peft.dropout"),
        (["peft.method=bitfit", "peft.modules_to_save=[lm_head]"], "peft.modules_to_save"),
        (["peft.method=lora", "peft.num_virtual_tokens=4"], "peft.num_virtual_tokens"),
        (["peft.method=prefix", "peft.target_modules=[q_proj]"], "peft.target_modules"),
        (["peft.method=lora", "peft.adapter_style=pfeiffer"], "peft.adapter_style"),
    ],
)
def test_a_peft_key_the_method_ignores_is_refused_at_load(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert set(e.value.keys) == {key, "peft.method"}
    assert key in str(e.value) and overrides[0] in str(e.value)


def test_rank_and_alpha_pass_through_so_a_lora_yaml_can_switch_method():
    cfg = load_config(None, ["peft.r=32", "peft.alpha=64", "peft.method=ia3"])
    assert cfg.peft.method is PeftMethod.IA3


def test_pfeiffer_adapters_follow_the_mlp_blocks_only(tiny_path):
    houlsby = load_policy(tiny_path, "float32", PeftSpec(method=PeftMethod.ADAPTER), CPU)
    pfeiffer = load_policy(
        tiny_path, "float32", PeftSpec(method=PeftMethod.ADAPTER, adapter_style="pfeiffer"), CPU
    )

    def blocks(model):
        return {n.split(".bottleneck")[0] for n, p in model.named_parameters() if p.requires_grad}

    both = {f"model.layers.{i}.{b}" for i in (0, 1) for b in ("self_attn", "mlp")}
    assert blocks(houlsby) == both
    assert blocks(pfeiffer) == {"model.layers.0.mlp", "model.layers.1.mlp"}


def test_auto_learning_rate_is_the_methods(tiny_path):
    """learner.lr=auto: LoRA at 10x the full fine-tuning rate; a number is taken as given."""
    rates = {m: build(tiny_path, "learner.lr=auto", f"peft.method={m}")[2].lr for m in METHODS}
    assert rates["lora"] == rates["dora"] == rates["qlora"] == 10 * rates["none"] == 1e-3
    assert all(r > 0 for r in rates.values())
    assert build(tiny_path, "learner.lr=2e-5", "peft.method=vera")[2].lr == 2e-5


def test_a_4bit_base_leaves_no_view_of_the_checkpoint_mapped(tiny_path):
    """QLoRA on CPU: the weights bitsandbytes leaves unquantised are copied out of the
    memory-mapped checkpoint, so the mapping (every page quantisation read: the whole fp32
    file) is released. Checked in a fresh process, whose maps no other model shares."""
    file = (Path(tiny_path) / "model.safetensors").resolve()
    code = (
        "import torch, pathlib\n"
        "from dist_ft.model.loading import load_policy\n"
        "from dist_ft.model.spec import PeftMethod, PeftSpec\n"
        f"m = load_policy({str(tiny_path)!r}, 'float32', PeftSpec(method=PeftMethod.QLORA), "
        "torch.device('cpu'))\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
        "print(pathlib.Path('/proc/self/maps').read_text())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.splitlines()[0]) > 0
    assert str(file) not in out.stdout
