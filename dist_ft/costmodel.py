"""What a GRPO step costs on a fleet of a given size, predicted from the step's shape and a few
stated rates: ``dist-ft plan --fleet`` prints it for a config, bench/fleet_scaling.py
``--predict`` for 7B-shaped models. Pure arithmetic.

A synchronous step (``grpo.max_staleness=0``) is modelled as its phases in sequence:

- generate: the N samples split evenly over W rollout workers, each producing
  ``worker_tokens_per_s`` completion tokens a second (every sample at its full
  ``max_new_tokens``: an upper bound);
- payload: every sample crosses the driver's link twice, in from its worker and out to the
  learners (``ScoredBatch.bytes_per_sample`` each way);
- train: 2 FLOPs per weight and token forward, 2 backward for the input gradients, 2 more for the
  weight gradients under full fine-tuning (PEFT trains a sliver of the weights), over every
  prompt and completion token, at ``learner_tflops`` achieved per learner rank;
- sync: the object store serves every worker its copy from learner rank 0's node, so its link
  carries W copies (an upper bound: Ray may serve later pulls from nodes that hold a copy); the
  collective is modelled as a binomial-tree broadcast, ceil(log2(W + 1)) rounds of one copy each
  (MPI's classic cost; NCCL's pipelined ring approaches a single copy's time);
- driver: ``driver_ms_per_worker`` of the driver's CPU per rollout worker and step (issuing,
  collecting, the sync notes: bench/fleet_scaling.py measures it).

Latencies, stragglers, the reference model's forward (``grpo.beta>0``) and the overlap that
``grpo.max_staleness>0`` buys are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Rates:
    """The rates the prediction rests on (see :data:`ASSUMPTIONS_HELP`)."""

    worker_tokens_per_s: float = 5000.0
    learner_tflops: float = 400.0
    link_gbps: float = 25.0
    driver_ms_per_worker: float = 1.9

    def describe(self) -> str:
        return (
            f"{self.worker_tokens_per_s:g} completion tokens/s per rollout worker, "
            f"{self.learner_tflops:g} TFLOP/s per learner rank, {self.link_gbps:g} Gbit/s "
            f"links, {self.driver_ms_per_worker:g} driver ms per worker"
        )


# Every assumption, and where its default comes from. Override them with dist-ft plan's flags.
ASSUMPTIONS_HELP = {
    "worker_tokens_per_s": "completion tokens/s of one rollout worker (default "
    f"{Rates.worker_tokens_per_s:g}: a 7B model on one H100 under vLLM at a large batch; "
    "measure yours with bench/generate_speed.py)",
    "learner_tflops": f"achieved TFLOP/s per learner rank (default {Rates.learner_tflops:g}: "
    "40 percent of an H100's dense bf16 peak)",
    "link_gbps": f"each node's network link in Gbit/s (default {Rates.link_gbps:g})",
    "driver_ms_per_worker": "the driver's CPU ms per rollout worker and step (default "
    f"{Rates.driver_ms_per_worker:g}: bench/fleet_scaling.py at 64 workers on this project's "
    "2-core CI machine)",
}


@dataclass(frozen=True)
class StepShape:
    """One step's work, from the config and the model's shape."""

    samples: int  # N = B x G
    prompt_tokens: int  # P, per sample (data.max_prompt_tokens: an upper bound)
    completion_tokens: int  # T, per sample (rollout.max_new_tokens)
    payload_bytes: int  # per sample, ScoredBatch.bytes_per_sample
    sync_bytes: int  # one weight sync: the adapter under PEFT, every weight otherwise
    full_bytes: int  # every weight
    params: int  # the policy's weights
    full: bool  # full fine-tuning (weight gradients for every weight)
    learners: int


@dataclass(frozen=True)
class StepCost:
    """Predicted seconds of each phase of one step, and the bytes it moves."""

    generate_s: float
    payload_s: float
    train_s: float
    sync_s: float
    driver_s: float
    payload_bytes: int  # through the driver's link, both ways
    sync_bytes: int  # all copies the workers receive

    @property
    def step_s(self) -> float:
        return self.generate_s + self.payload_s + self.train_s + self.sync_s + self.driver_s

    @property
    def bytes(self) -> int:
        return self.payload_bytes + self.sync_bytes


def predict(shape: StepShape, workers: int, transport: str, rates: Rates) -> StepCost:
    """The cost of one step of ``shape`` on ``workers`` rollout workers; ``transport``:
    "collective" or the object store (anything else)."""
    link = rates.link_gbps * 1e9 / 8  # bytes/s
    per_worker = math.ceil(shape.samples / workers)  # the slowest worker's share
    tokens = shape.samples * (shape.prompt_tokens + shape.completion_tokens)
    flops = (6 if shape.full else 4) * shape.params * tokens
    payload = 2 * shape.samples * shape.payload_bytes
    copy_s = shape.sync_bytes / link
    if transport == "collective":
        sync_s = math.ceil(math.log2(workers + 1)) * copy_s
    else:
        sync_s = workers * copy_s
    return StepCost(
        generate_s=per_worker * shape.completion_tokens / rates.worker_tokens_per_s,
        payload_s=payload / link,
        train_s=flops / (shape.learners * rates.learner_tflops * 1e12),
        sync_s=sync_s,
        driver_s=workers * rates.driver_ms_per_worker / 1000,
        payload_bytes=payload,
        sync_bytes=workers * shape.sync_bytes,
    )


def cost_table(shape: StepShape, fleet: list[int], transport: str, rates: Rates) -> list[str]:
    """The prediction for each fleet size, as aligned lines (header first)."""
    lines = [
        f"  {'workers':>7} {'step s':>9} {'generate':>9} {'payload':>8} {'train':>8} "
        f"{'sync':>9} {'driver':>7} {'bytes/step':>11}"
    ]
    for w in fleet:
        c = predict(shape, w, transport, rates)
        lines.append(
            f"  {w:>7,} {c.step_s:>9.1f} {c.generate_s:>9.1f} {c.payload_s:>8.2f} "
            f"{c.train_s:>8.1f} {c.sync_s:>9.1f} {c.driver_s:>7.2f} {human_bytes(c.bytes):>11}"
        )
    return lines


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
