"""``ScoredBatch``: the only payload a rollout worker sends back.

It carries token ids, logprobs, rewards and advantages, never gradients or weights, so a step's
traffic from rollout to learner is kilobytes. Shapes: N = B x G samples (B prompts, G
completions each), P = prompt tokens (left-padded), T = completion tokens (right-padded),
K = reward functions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

_PROMPT_ALIGNED = ("prompt_ids", "prompt_mask")
_COMPLETION_ALIGNED = ("completion_ids", "completion_mask", "logprobs", "ref_logprobs")


@dataclass
class ScoredBatch:
    prompt_ids: torch.Tensor  # [N, P] int32, left-padded
    prompt_mask: torch.Tensor  # [N, P] bool
    completion_ids: torch.Tensor  # [N, T] int32, right-padded
    completion_mask: torch.Tensor  # [N, T] bool, 1 up to and including EOS
    logprobs: torch.Tensor  # [N, T] float32, behaviour policy (the version that sampled)
    rewards: torch.Tensor  # [N, K] float32, one column per reward function (unweighted)
    reward_total: torch.Tensor  # [N] float32, weighted sum of the columns
    advantages: torch.Tensor  # [N] float32, group-relative
    sample_ids: torch.Tensor  # [N, 3] int32: (step, prompt index, completion index)
    versions: torch.Tensor  # [N] int32, policy version that generated each sample
    reward_names: list[str]
    reward_errors: torch.Tensor | None = None  # [N, K] bool: that function failed on it
    valid: torch.Tensor | None = None  # [N] bool: trained on (False: reward error, stale, dup)
    ref_logprobs: torch.Tensor | None = None  # [N, T] float32, only when the KL term is on
    # worker index -> (samples, seconds generating and scoring them): per-worker samples/s.
    worker_stats: dict[int, tuple[int, float]] = dataclasses.field(default_factory=dict)
    # Counts to log, summed over workers (e.g. judge requests and cache hits).
    counters: dict[str, float] = dataclasses.field(default_factory=dict)
    # reward name -> the first error message of this batch (failing functions only), so the
    # driver can say why when it stops a run.
    reward_messages: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.prompt_ids.shape[0]
        if self.valid is None:
            self.valid = torch.ones(n, dtype=torch.bool)
        if self.reward_errors is None:
            self.reward_errors = torch.zeros(n, len(self.reward_names), dtype=torch.bool)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.shape[0] != n:
                raise ValueError(f"ScoredBatch.{f.name} has {value.shape[0]} rows, expected {n}")
        if self.rewards.shape[1] != len(self.reward_names):
            raise ValueError("ScoredBatch.rewards needs one column per reward name")

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this batch carries (what crosses the wire, less pickling)."""
        return sum(t.nbytes for t in self._tensors().values())

    @staticmethod
    def bytes_per_sample(
        prompt_tokens: int, completion_tokens: int, rewards: int, ref: bool
    ) -> int:
        """Upper bound of :attr:`nbytes` per sample for the given padded widths (for planning):
        int32 ids + bool masks, float32 logprobs (x2 with reference), K + 1 rewards, advantage,
        int32 (step, prompt, completion) id and version, bool reward-error flags and validity."""
        p, t = prompt_tokens, completion_tokens
        flags = rewards + 1
        return 5 * p + 5 * t + 4 * t * (2 if ref else 1) + 4 * (rewards + 1) + 4 + 12 + 4 + flags

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    @property
    def loss_mask(self) -> torch.Tensor:
        """[N, T] bool: completion tokens of the samples the loss uses."""
        return self.completion_mask & self.valid[:, None]

    def select(self, index: torch.Tensor | list[int]) -> ScoredBatch:
        """Rows ``index`` of every tensor (used to split a step across ranks or micro-batches)."""
        index = torch.as_tensor(index, dtype=torch.long)
        picked = {k: v[index] for k, v in self._tensors().items()}
        return ScoredBatch(
            reward_names=list(self.reward_names),
            worker_stats=dict(self.worker_stats),
            counters=dict(self.counters),
            reward_messages=dict(self.reward_messages),
            **picked,
        )

    @staticmethod
    def concat(batches: list[ScoredBatch]) -> ScoredBatch:
        """Stack batches from several workers; prompts and completions are re-padded."""
        if not batches:
            raise ValueError("nothing to concatenate")
        names = batches[0].reward_names
        if any(b.reward_names != names for b in batches):
            raise ValueError("batches disagree on reward functions")

        def pad_cat(key: str, left: bool) -> torch.Tensor:
            parts = [getattr(b, key) for b in batches]
            width = max(p.shape[1] for p in parts)
            padded = []
            for p in parts:
                fill = torch.zeros(p.shape[0], width - p.shape[1], dtype=p.dtype)
                padded.append(torch.cat([fill, p] if left else [p, fill], dim=1))
            return torch.cat(padded)

        fields = {}
        for key in batches[0]._tensors():
            if key in _PROMPT_ALIGNED:
                fields[key] = pad_cat(key, left=True)
            elif key in _COMPLETION_ALIGNED:
                fields[key] = pad_cat(key, left=False)
            else:
                fields[key] = torch.cat([getattr(b, key) for b in batches])
        stats: dict[int, tuple[int, float]] = {}
        for b in batches:
            for k, (n, sec) in b.worker_stats.items():
                n0, sec0 = stats.get(k, (0, 0.0))
                stats[k] = (n0 + n, sec0 + sec)
        counters: dict[str, float] = {}
        for b in batches:
            for k, v in b.counters.items():
                counters[k] = counters.get(k, 0.0) + v
        messages: dict[str, str] = {}
        for b in batches:
            for k, m in b.reward_messages.items():
                messages.setdefault(k, m)
        return ScoredBatch(
            reward_names=list(names),
            worker_stats=stats,
            counters=counters,
            reward_messages=messages,
            **fields,
        )

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat ``{prefix + field: tensor}``, e.g. for a safetensors file (checkpoints)."""
        return {prefix + k: v for k, v in self._tensors().items()}

    @staticmethod
    def from_tensors(
        tensors: dict[str, torch.Tensor], prefix: str, reward_names: list[str]
    ) -> ScoredBatch:
        picked = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        return ScoredBatch(reward_names=reward_names, **picked)


def balanced_shards(batch: ScoredBatch, parts: int) -> list[ScoredBatch]:
    """Equal sample counts per rank (DeepSpeed's batch size is per rank), balanced by tokens:
    samples sorted by length are dealt out in snake order (0, 1, ..., p-1, p-1, ..., 0)."""
    order = torch.argsort(batch.completion_mask.sum(-1), descending=True, stable=True).tolist()
    shards: list[list[int]] = [[] for _ in range(parts)]
    for i, idx in enumerate(order):
        lap, pos = divmod(i, parts)
        shards[pos if lap % 2 == 0 else parts - 1 - pos].append(idx)
    return [batch.select(sorted(s)) for s in shards]
