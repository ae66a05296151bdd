"""``ScoredBatch``: the only payload a rollout worker sends back.

It carries token ids, logprobs, rewards and advantages, never gradients or weights, so a step's
traffic from rollout to learner is kilobytes. Shapes: N = B x G samples (B prompts, G
completions each), Bg = groups (prompts) in this batch, P = prompt tokens (left-padded), T =
episode tokens after the prompt (right-padded), K = reward functions.

A sample is its group's prompt plus an episode: the tokens after the prompt, with a per-token
:class:`Span` code. Single-turn, the episode is the completion and every token up to and
including EOS is ``TRAINED``. Multi-turn, environment and tool tokens sit between the model's
turns as ``CONTEXT``: the learner's forward attends to them, the loss gives them no weight.
Groups are explicit: ``group_ids`` rows index ``prompt_ids``, so each prompt travels once per
group rather than once per sample, and nothing reads groups from row order.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dist_ft.algos.common import group_slots

_GROUP_ALIGNED = ("prompt_ids", "prompt_mask")  # [Bg, ...], indexed by group_ids
_EPISODE_ALIGNED = ("episode_ids", "episode_mask", "logprobs", "ref_logprobs")  # [N, T]


class Span(enum.IntEnum):
    """What one episode token is (the values of ``ScoredBatch.episode_mask``). One int8 code
    rather than two bool masks: 1 byte per token instead of 2."""

    PAD = 0  # no token: neither attended nor trained
    CONTEXT = 1  # in the sequence the model conditions on (env/tool output), not trained
    TRAINED = 2  # sampled by the policy and trained on


@dataclass
class ScoredBatch:
    prompt_ids: torch.Tensor  # [Bg, P] int32, left-padded, one row per group
    prompt_mask: torch.Tensor  # [Bg, P] bool
    group_ids: torch.Tensor  # [N] int32: the row of prompt_ids each sample continues
    episode_ids: torch.Tensor  # [N, T] int32, right-padded: every token after the prompt
    episode_mask: torch.Tensor  # [N, T] int8 Span codes: 0 padding, 1 context, 2 trained
    logprobs: torch.Tensor  # [N, T] float32, behaviour policy on TRAINED tokens, 0 elsewhere
    rewards: torch.Tensor  # [N, K] float32, one column per reward function (unweighted)
    reward_total: torch.Tensor  # [N] float32, weighted sum of the columns
    advantages: torch.Tensor  # [N] float32, group-relative
    sample_ids: torch.Tensor  # [N, 3] int32: (step, prompt index, completion index)
    versions: torch.Tensor  # [N] int32, policy version that generated each sample
    reward_names: list[str]
    # The next two default to None, which means no errors and all valid: __post_init__ fills
    # them, so after construction they are always tensors (hence the ignores on the default).
    # [N, K] bool: that function failed on it
    reward_errors: torch.Tensor = None  # type: ignore[assignment]
    # [N] bool: trained on (False: reward error, stale, dup)
    valid: torch.Tensor = None  # type: ignore[assignment]
    ref_logprobs: torch.Tensor | None = None  # [N, T] float32, only when the KL term is on
    # [N] int8, only under peft.adapters: the adapter (its place in peft.adapters) that
    # generated each sample, and that the learner trains on it
    adapter_ids: torch.Tensor | None = None
    # worker index -> (samples, seconds generating and scoring them): per-worker samples/s.
    worker_stats: dict[int, tuple[int, float]] = dataclasses.field(default_factory=dict)
    # Counts to log, summed over workers (e.g. judge requests and cache hits).
    counters: dict[str, float] = dataclasses.field(default_factory=dict)
    # reward name -> the first error message of this batch (failing functions only), so the
    # driver can say why when it stops a run.
    reward_messages: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n, groups = self.group_ids.shape[0], self.prompt_ids.shape[0]
        if self.valid is None:
            self.valid = torch.ones(n, dtype=torch.bool)
        if self.reward_errors is None:
            self.reward_errors = torch.zeros(n, len(self.reward_names), dtype=torch.bool)
        for name, value in self._tensors().items():
            rows = groups if name in _GROUP_ALIGNED else n
            if value.shape[0] != rows:
                raise ValueError(f"ScoredBatch.{name} has {value.shape[0]} rows, expected {rows}")
        if n and (int(self.group_ids.min()) < 0 or int(self.group_ids.max()) >= groups):
            raise ValueError(f"ScoredBatch.group_ids must index the {groups} prompt rows")
        if self.rewards.shape[1] != len(self.reward_names):
            raise ValueError("ScoredBatch.rewards needs one column per reward name")

    def __len__(self) -> int:
        return self.group_ids.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        # Pickled as numpy arrays: a tensor pickles through torch.save, ~0.15 ms of the
        # receiver's CPU each (a batch has ~13), while an array is a raw buffer that Ray passes
        # out of band. At 64 rollout workers that was most of the driver's time per step
        # (bench/fleet_scaling.py).
        return {
            k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Ray hands back read-only views of its object store, which a tensor must not write
        # through (the ledger marks samples invalid in place): those are copied.
        self.__dict__.update(
            {
                k: torch.from_numpy(v if v.flags.writeable else v.copy())
                if isinstance(v, np.ndarray)
                else v
                for k, v in state.items()
            }
        )

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
        prompt_tokens: int,
        episode_tokens: int,
        rewards: int,
        ref: bool,
        group_size: int = 1,
        adapters: bool = False,
    ) -> int:
        """Upper bound of :attr:`nbytes` per sample for the given padded widths (for planning),
        rounded up to a whole byte. Per group: int32 prompt ids + bool mask. Per sample: int32
        group id; int32 episode ids + int8 span codes and float32 logprobs (x2 with reference)
        per token; K + 1 float32 rewards, advantage, int32 (step, prompt, completion) id and
        version, bool reward-error flags and validity, and with ``adapters`` (``peft.adapters``)
        an int8 adapter id. ``group_size=1`` bounds any grouping."""
        p, t, k = prompt_tokens, episode_tokens, rewards
        per_sample = 4 + 5 * t + 4 * t * (2 if ref else 1) + 4 * (k + 1) + 4 + 12 + 4 + (k + 1)
        per_sample += 1 if adapters else 0
        return per_sample + -(-5 * p // group_size)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[N, T] bool: tokens that exist (the forward attends to all of them)."""
        return self.episode_mask != Span.PAD

    @property
    def trainable_mask(self) -> torch.Tensor:
        """[N, T] bool: tokens the policy sampled (the only ones with behaviour logprobs)."""
        return self.episode_mask == Span.TRAINED

    @property
    def num_tokens(self) -> int:
        """Trained tokens in this batch."""
        return int(self.trainable_mask.sum())

    @property
    def loss_mask(self) -> torch.Tensor:
        """[N, T] bool: trained tokens of the samples the loss uses."""
        return self.trainable_mask & self.valid[:, None]

    def turns(self, i: int) -> list[tuple[Span, list[int]]]:
        """Sample ``i``'s episode as its runs of one span code, in order, padding left out:
        one (TRAINED, ids) run single-turn; model turns and environment turns alternating
        multi-turn."""
        runs: list[tuple[Span, list[int]]] = []
        for token, code in zip(self.episode_ids[i].tolist(), self.episode_mask[i].tolist()):
            if code == Span.PAD:
                continue
            if runs and runs[-1][0] == code:
                runs[-1][1].append(token)
            else:
                runs.append((Span(code), [token]))
        return runs

    def sample_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's prompt ids and mask, [N, P] each: the prompt table expanded for a
        forward pass (only the learner needs the G copies; they never travel)."""
        return self.prompt_ids[self.group_ids], self.prompt_mask[self.group_ids]

    def select(self, index: torch.Tensor | list[int]) -> ScoredBatch:
        """Samples ``index`` (used to split a step across ranks or micro-batches).

        Only the prompts those samples reference are kept, in their original order, and group
        ids are renumbered to match: a shard carries each of its prompts once and nothing more.
        """
        index = torch.as_tensor(index, dtype=torch.long)
        used, group_ids = torch.unique(self.group_ids[index], return_inverse=True)
        picked = {
            k: v[used] if k in _GROUP_ALIGNED else v[index]
            for k, v in self._tensors().items()
            if k != "group_ids"
        }
        return ScoredBatch(
            group_ids=group_ids.to(torch.int32),
            reward_names=list(self.reward_names),
            worker_stats=dict(self.worker_stats),
            counters=dict(self.counters),
            reward_messages=dict(self.reward_messages),
            **picked,
        )

    def select_groups(self, groups: torch.Tensor | list[int]) -> ScoredBatch:
        """Every sample of groups ``groups`` (ids into this batch's prompt rows), in row order."""
        groups = torch.as_tensor(groups, dtype=torch.long)
        return self.select(torch.isin(self.group_ids.long(), groups).nonzero().squeeze(-1))

    @staticmethod
    def concat(batches: list[ScoredBatch]) -> ScoredBatch:
        """Stack batches from several workers; prompts and episodes are re-padded, and each
        batch's group ids are offset past the prompt rows of the batches before it."""
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
            if key in _GROUP_ALIGNED:
                fields[key] = pad_cat(key, left=True)
            elif key in _EPISODE_ALIGNED:
                fields[key] = pad_cat(key, left=False)
            elif key == "group_ids":
                offsets = torch.tensor([0] + [len(b.prompt_ids) for b in batches]).cumsum(0)
                fields[key] = torch.cat(
                    [b.group_ids + int(o) for b, o in zip(batches, offsets)]
                ).to(torch.int32)
            else:
                fields[key] = torch.cat([getattr(b, key) for b in batches])
        stats: dict[int, tuple[int, float]] = {}
        for b in batches:
            for k, (n, sec) in b.worker_stats.items():
                n0, sec0 = stats.get(k, (0, 0.0))
                stats[k] = (n0 + n, sec0 + sec)
        counters: dict[str, float] = {}
        for b in batches:
            for name, v in b.counters.items():
                counters[name] = counters.get(name, 0.0) + v
        messages: dict[str, str] = {}
        for b in batches:
            for name, m in b.reward_messages.items():
                messages.setdefault(name, m)
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
    def supervised(
        prompt_ids_NP: torch.Tensor,
        prompt_mask_NP: torch.Tensor,
        target_ids_NT: torch.Tensor,
        target_mask_NT: torch.Tensor,
    ) -> ScoredBatch:
        """Demonstrations (prompt -> target) as a batch the learner trains with ``"sft"``:
        each pair its own group, every target token ``TRAINED``; no rewards, no logprobs."""
        n = prompt_ids_NP.shape[0]
        zeros_N = torch.zeros(n, dtype=torch.float32)
        return ScoredBatch(
            prompt_ids=prompt_ids_NP.to(torch.int32),
            prompt_mask=prompt_mask_NP.bool(),
            group_ids=torch.arange(n, dtype=torch.int32),
            episode_ids=target_ids_NT.to(torch.int32),
            episode_mask=(target_mask_NT.bool() * Span.TRAINED).to(torch.int8),
            logprobs=torch.zeros(target_ids_NT.shape, dtype=torch.float32),
            rewards=torch.zeros(n, 0),
            reward_total=zeros_N,
            advantages=zeros_N,
            sample_ids=torch.zeros(n, 3, dtype=torch.int32),
            versions=torch.zeros(n, dtype=torch.int32),
            reward_names=[],
        )

    @staticmethod
    def from_sequences(
        ids: list[torch.Tensor],
        spans: list[torch.Tensor],
        group_ids: list[int],
        indices: list[int],
        pad_id: int,
    ) -> ScoredBatch:
        """Data sequences (SFT demonstrations, DPO answers) as a batch: each [L] sequence of ids
        with its [L] Span codes is split at its first TRAINED token into the prompt (before it)
        and the episode (from it on, CONTEXT turns included). Rows of one group share their
        prompt (a DPO pair's two answers); ``indices`` are the source rows, kept as sample ids.
        """
        firsts = [int((sp == Span.TRAINED).nonzero()[0]) for sp in spans]
        groups = sorted(set(group_ids))
        prompts: dict[int, torch.Tensor] = {}
        for x, k, g in zip(ids, firsts, group_ids):
            if g in prompts and not torch.equal(prompts[g], x[:k]):
                raise ValueError(f"rows of group {g} have different prompts")
            prompts.setdefault(g, x[:k])
        p = max((len(v) for v in prompts.values()), default=0)
        t = max((len(x) - k for x, k in zip(ids, firsts)), default=0)
        n = len(ids)
        prompt_ids = torch.full((len(groups), p), pad_id, dtype=torch.int32)
        prompt_mask = torch.zeros((len(groups), p), dtype=torch.bool)
        for row, g in enumerate(groups):  # left-padded
            if len(prompts[g]):
                prompt_ids[row, p - len(prompts[g]) :] = prompts[g]
                prompt_mask[row, p - len(prompts[g]) :] = True
        episode_ids = torch.full((n, t), pad_id, dtype=torch.int32)
        episode_mask = torch.zeros((n, t), dtype=torch.int8)
        for i, (x, sp, k) in enumerate(zip(ids, spans, firsts)):  # right-padded
            episode_ids[i, : len(x) - k] = x[k:]
            episode_mask[i, : len(x) - k] = sp[k:]
        row_of = {g: row for row, g in enumerate(groups)}
        zeros_N = torch.zeros(n, dtype=torch.float32)
        slots = group_slots(torch.tensor([row_of[g] for g in group_ids]))
        return ScoredBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            group_ids=torch.tensor([row_of[g] for g in group_ids], dtype=torch.int32),
            episode_ids=episode_ids,
            episode_mask=episode_mask,
            logprobs=torch.zeros((n, t), dtype=torch.float32),
            rewards=torch.zeros(n, 0),
            reward_total=zeros_N,
            advantages=zeros_N,
            sample_ids=torch.stack(
                [torch.zeros(n, dtype=torch.long), torch.tensor(indices), slots], dim=1
            ).to(torch.int32),
            versions=torch.zeros(n, dtype=torch.int32),
            reward_names=[],
        )

    @staticmethod
    def from_tensors(
        tensors: dict[str, torch.Tensor], prefix: str, reward_names: list[str]
    ) -> ScoredBatch:
        # Any: the tensors fill whichever fields their names say, which mypy cannot follow
        picked: dict[str, Any] = {
            k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)
        }
        return ScoredBatch(reward_names=reward_names, **picked)


def balanced_shards(
    batch: ScoredBatch, parts: int, whole_groups: bool = False
) -> list[ScoredBatch]:
    """Equal sample counts per rank (DeepSpeed's batch size is per rank), balanced by tokens:
    samples sorted by length are dealt out in snake order (0, 1, ..., p-1, p-1, ..., 0).
    ``whole_groups``: deal groups instead (an objective whose loss couples a group's samples,
    as DPO's pairs, needs each group on one rank)."""
    # Sorted by attended tokens (context included): that is what a forward pass costs.
    lengths = batch.attention_mask.sum(-1)  # [N]
    if whole_groups:
        lengths = torch.zeros(len(batch.prompt_ids), dtype=lengths.dtype).index_add_(
            0, batch.group_ids.long(), lengths
        )  # [Bg]
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    shards: list[list[int]] = [[] for _ in range(parts)]
    for i, idx in enumerate(order):
        lap, pos = divmod(i, parts)
        shards[pos if lap % 2 == 0 else parts - 1 - pos].append(idx)
    if whole_groups:
        return [batch.select_groups(sorted(s)) for s in shards]
    return [batch.select(sorted(s)) for s in shards]
