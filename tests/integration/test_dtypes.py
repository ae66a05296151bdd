"""model.dtype x rollout.dtype x peft.method: every combination the config accepts trains 3 steps
with each sync's fingerprint matched on what the workers hold after loading, and the learner's
recomputed logprobs match the behaviour logprobs; a combination that cannot run is refused at
config load, naming both keys.

Ratio tolerance (the step's mean of exp(learner logp - behaviour logp) over trained tokens):

- Same dtype on both sides (fp32/fp32, bf16/bf16): 1e-5. The fingerprint makes the weights
  bit-identical, and CPU kernels give the same logits for a row whatever the batch around it, so
  every token's logprob is equal (measured: exactly 0 difference in fp32 and in bf16, with 1 and
  4 micro-batches). A bf16 worker holding its LoRA adapter in fp32 (the bug this file guards)
  already breaks this bound.
- Different dtypes (fp32 learner and bf16 or fp16 rollout, or the reverse): 1e-2. The two sides
  compute different functions: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3), so
  the rounded weights and bf16 logits move a token's logprob by up to 0.19 on the tiny model
  (std 0.025-0.036 per token). The ratio's expectation under the behaviour policy is still 1,
  so its mean over n ~ 500 trained tokens is 1 +- std/sqrt(n) ~ 1.6e-3 (measured at most
  2.4e-3); 1e-2 is about 6 of those standard errors. Per-token deviations are not bounded here:
  they are the known bf16 training/inference mismatch, which PPO's clip (0.2) absorbs.
"""

import json
from pathlib import Path

import pytest
import torch

from dist_ft.config import ConfigError, load_config
from dist_ft.model.loading import DTYPES
from dist_ft.recipes.grpo import train
from dist_ft.rollout import RolloutWorker
from dist_ft.sync.inprocess import InProcessTransport

FAST = ["run.wandb=disabled", "run.plot=false", "run.steps=3", "grpo.sft_warmup_steps=0"]
SAME_DTYPE_TOL, MIXED_DTYPE_TOL = 1e-5, 1e-2

# Every pair the config accepts on CPU (model.dtype=float16 trains on CUDA only): "auto" is the
# rollout in model.dtype, the others a rollout in another dtype than the learner.
ACCEPTED_ON_CPU = [
    ("float32", "auto"),
    ("float32", "bfloat16"),
    ("float32", "float16"),
    ("bfloat16", "auto"),
    ("bfloat16", "float32"),
    ("bfloat16", "float16"),
]


@pytest.fixture
def syncs(monkeypatch):
    """Every fingerprint check of the run: (version, published floating dtypes, learner's
    fingerprint, workers' fingerprints, read back?). The original check still runs."""
    import dist_ft.cluster.local as local
    import dist_ft.cluster.ray as ray_cluster

    seen = []

    def spy(original):
        def check(update, prints, read_back):
            tensors = update.handle
            if not isinstance(tensors, dict):  # Ray: an object ref (the cluster never fetches)
                import ray

                tensors = ray.get(tensors)
            dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
            seen.append((update.version, dtypes, update.fingerprint, list(prints), read_back))
            original(update, prints, read_back)

        return check

    monkeypatch.setattr(local, "check_fingerprints", spy(local.check_fingerprints))
    monkeypatch.setattr(ray_cluster, "check_fingerprints", spy(ray_cluster.check_fingerprints))
    return seen


def run(out: Path, *overrides: str) -> list[dict]:
    train(load_config(None, [*FAST, f"run.output_dir={out}", *overrides]))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_run(metrics, syncs, model_dtype, rollout_dtype, workers, tol=None):
    held = DTYPES[model_dtype if rollout_dtype == "auto" else rollout_dtype]
    # the first sync (v0) and one after each step; every worker held exactly what was sent
    assert [s[0] for s in syncs] == [0, 1, 2, 3]
    for version, dtypes, sent, prints, read_back in syncs:
        assert read_back, version
        assert prints == [sent] * workers, version
        assert dtypes == {held}, version  # cast once, at the sender: the sync is that size
    assert syncs[0][2] != syncs[-1][2]  # training moved the synced weights
    assert [m["version"] for m in metrics] == [1, 2, 3]
    if tol is None:
        tol = SAME_DTYPE_TOL if DTYPES[model_dtype] == held else MIXED_DTYPE_TOL
    assert all(abs(m["ratio"] - 1) <= tol for m in metrics), [m["ratio"] for m in metrics]


@pytest.mark.parametrize("peft", ["lora", "none"])
@pytest.mark.parametrize(("model_dtype", "rollout_dtype"), ACCEPTED_ON_CPU)
def test_every_accepted_dtype_pair_trains_and_syncs_bit_exactly_in_debug_mode(
    tmp_path, syncs, model_dtype, rollout_dtype, peft
):
    metrics = run(
        tmp_path / "run",
        f"model.dtype={model_dtype}",
        f"rollout.dtype={rollout_dtype}",
        f"peft.method={peft}",
        "resources.device=cpu",
    )
    check_run(metrics, syncs, model_dtype, rollout_dtype, workers=1)


@pytest.mark.parametrize("peft", ["lora", "none"])
@pytest.mark.parametrize(
    ("model_dtype", "rollout_dtype"), [("bfloat16", "auto"), ("float32", "bfloat16")]
)
def test_bf16_trains_and_syncs_bit_exactly_on_a_two_worker_ray(
    tmp_path, syncs, model_dtype, rollout_dtype, peft
):
    metrics = run(
        tmp_path / "run",
        f"model.dtype={model_dtype}",
        f"rollout.dtype={rollout_dtype}",
        f"peft.method={peft}",
        "resources.device=cpu",
        "resources.mode=ray",
        "resources.ray_address=local",
        "resources.rollout_workers=2",
        "rollout.read_back_every=1",  # read back every sync, as debug mode does
    )
    check_run(metrics, syncs, model_dtype, rollout_dtype, workers=2)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_fp16_training_off_cuda_is_refused_at_load_naming_both_keys(device):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.dtype=float16", f"resources.device={device}"])
    assert set(e.value.keys) == {"model.dtype", "resources.device"}
    assert "model.dtype=float16" in str(e.value) and f"resources.device={device}" in str(e.value)


def test_a_sync_in_another_dtype_than_the_worker_holds_is_refused_before_loading(tiny_path):
    # A worker loaded in bf16 holds its LoRA adapter in bf16 too (peft would upcast it to fp32).
    cfg = load_config(None, ["run.wandb=disabled", "rollout.dtype=bfloat16", "peft.method=lora"])
    from dist_ft.run.specs import component_specs

    rollout, _ = component_specs(cfg, tiny_path)
    worker = RolloutWorker(rollout)
    held = worker.generator.export_weights()
    assert {t.dtype for t in held.values()} == {torch.bfloat16}
    before = worker.fingerprint()
    update = InProcessTransport().publish(1, {k: v.float() + 0.5 for k, v in held.items()})
    with pytest.raises(TypeError, match=r"holds its policy in torch.bfloat16"):
        worker.set_weights(update, InProcessTransport(), read_back=True)
    assert worker.fingerprint() == before and worker.version == 0  # nothing was loaded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("peft", ["lora", "none"])
def test_fp16_trains_and_syncs_bit_exactly_on_cuda(tmp_path, syncs, peft):
    # GPU kernels depend on the batch shape: no bit-identical logprobs, hence the mixed bound.
    metrics = run(
        tmp_path / "run", "model.dtype=float16", f"peft.method={peft}", "resources.device=cuda"
    )
    check_run(metrics, syncs, "float16", "auto", workers=1, tol=MIXED_DTYPE_TOL)
