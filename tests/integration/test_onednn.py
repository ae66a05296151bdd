"""resources.cpu_linear=onednn: large fp32 CPU products on oneDNN, against float64 and torch's
own path, and the learner's logprobs still equal to the rollout's."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from support import build, load_learner_weights
from test_hf_generator import PROMPTS, generator, learner_logprobs
from torch.profiler import profile

from dist_ft.learner import Learner
from dist_ft.model import onednn
from dist_ft.model.loading import load_policy
from dist_ft.model.spec import PeftMethod, PeftSpec
from dist_ft.rollout import RolloutWorker
from dist_ft.rollout.base import GeneratorSpec
from dist_ft.rollout.hf import HFGenerator, HFOptions

pytestmark = pytest.mark.skipif(not onednn.available(), reason="torch built without oneDNN")
CPU = torch.device("cpu")


def onednn_calls(fn) -> int:
    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


def layer(in_features: int, out_features: int) -> torch.nn.Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_features, out_features)
    assert onednn.convert(lin) == 1 and isinstance(lin, onednn.OneDNNLinear)
    return lin


def test_a_large_product_runs_on_onednn_forward_and_backward_to_fp32_accuracy():
    lin = layer(576, 1536)  # SmolLM2's MLP up-projection, 16 decode rows: a "large" product
    x = torch.randn(2, 8, 576, requires_grad=True)
    g = torch.randn(2, 8, 1536)
    out = {}

    def step():
        y = lin(x)
        (y * g).sum().backward()
        out["y"] = y.detach()

    assert onednn_calls(step) == 2  # the forward and the input gradient
    # float64 reference of the same function
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, lin.weight, lin.bias))
    y64 = F.linear(x64, w64, b64)
    (y64 * g.double()).sum().backward()
    for got, want in [
        (out["y"], y64),
        (x.grad, x64.grad),
        (lin.weight.grad, w64.grad),
        (lin.bias.grad, b64.grad),
    ]:
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() < 1e-5 * scale


def test_a_frozen_weight_gets_no_gradient_and_a_small_product_keeps_torchs_path():
    lin = layer(576, 1536).requires_grad_(False)
    x = torch.randn(16, 576, requires_grad=True)
    lin(x).sum().backward()
    assert lin.weight.grad is None and x.grad is not None

    small = layer(64, 64)  # the tiny model's shape: oneDNN's set-up would cost more than MKL
    x = torch.randn(16, 64)
    assert onednn_calls(lambda: small(x)) == 0
    assert torch.equal(small(x), F.linear(x, small.weight, small.bias))


def test_convert_swaps_plain_fp32_linears_and_keeps_the_state_dict(tiny_path):
    model = load_policy(tiny_path, "float32", PeftSpec(r=8, alpha=16), CPU)
    keys = list(model.state_dict())
    n = onednn.convert(model)
    lora_layers = [m for m in model.modules() if hasattr(m, "base_layer")]
    # peft's wrappers keep their forward; what they wrap and the LoRA factors are converted
    assert lora_layers and not any(isinstance(m, onednn.OneDNNLinear) for m in lora_layers)
    assert all(isinstance(m.base_layer, onednn.OneDNNLinear) for m in lora_layers)
    plain = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert n == len(plain) > 3 * len(lora_layers)  # base, A, B of each, and lm_head
    assert list(model.state_dict()) == keys
    bf16 = load_policy(tiny_path, "bfloat16", PeftSpec(method=PeftMethod.NONE), CPU)
    assert onednn.convert(bf16) == 0  # bf16 runs on oneDNN already


@pytest.mark.parametrize("choice", ["onednn", "torch"])
def test_the_generator_follows_resources_cpu_linear(tiny_path, choice):
    spec = GeneratorSpec(tiny_path, "float32", PeftSpec(), "cpu", 4, 1.0, 1.0, False)
    gen = HFGenerator(replace(spec, options=HFOptions(cpu_linear=choice)))
    converted = [m for m in gen.model.modules() if isinstance(m, onednn.OneDNNLinear)]
    assert bool(converted) == (choice == "onednn")


def test_every_product_on_onednn_keeps_the_sampling_logprobs_equal_to_the_learners(
    tiny_path, monkeypatch
):
    """The tiny model's products all under the thresholds: lowered to 0, every layer of the
    rollout's decode and of the learner's forward runs on oneDNN, in different shapes (decode
    rows one token at a time, the learner's all at once). Their logprobs still agree."""
    monkeypatch.setattr(onednn, "MIN_MACS", 0)
    monkeypatch.setattr(onednn, "MIN_ELEMENTS", 0)
    gen = generator(tiny_path, "float32")
    torch.manual_seed(0)
    calls = onednn_calls(lambda: gen.generate(PROMPTS, 4))
    assert calls > 0
    out = gen.generate(PROMPTS, 4)
    learner_NT = learner_logprobs(gen, out)
    torch.testing.assert_close(out.logprobs, learner_NT, atol=1e-4, rtol=0)
    mask_NT = (out.episode_mask != 0).long()
    ratio = ((learner_NT - out.logprobs) * mask_NT).sum() / mask_NT.sum()
    assert abs(ratio.exp().item() - 1.0) < 1e-5


def test_an_on_policy_learner_step_on_onednn_has_ratio_one(tiny_path, demo_prompts, monkeypatch):
    """Learner and rollout worker converted (the default), every product on oneDNN."""
    monkeypatch.setattr(onednn, "MIN_MACS", 0)
    monkeypatch.setattr(onednn, "MIN_ELEMENTS", 0)
    _, wk, lk = build(tiny_path, "algo.prompts_per_step=4")
    learner = Learner(lk)
    worker = RolloutWorker(wk)
    assert any(isinstance(m, onednn.OneDNNLinear) for m in learner.module.modules())
    load_learner_weights(worker, learner)
    batch = worker.rollout(1, demo_prompts[:4], seed=0)
    metrics = {}
    assert onednn_calls(lambda: metrics.update(learner.step(batch))) > 0
    assert abs(metrics["ratio"] - 1.0) < 1e-5
