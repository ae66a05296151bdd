"""What every cluster offers the training loop (the ``Cluster`` protocol), and the pieces that
local and Ray placement share: one step's pending rollout, prompt shares and their seeds."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from dist_ft.wire.batch import ScoredBatch

if TYPE_CHECKING:  # dist_ft.data imports `datasets`, which nothing here needs at run time
    from dist_ft.wire.prompt import Prompt


@dataclass(frozen=True)
class SyncStats:
    version: int
    nbytes: int
    seconds: float


@dataclass
class PendingRollout:
    """One step's rollout, issued and not yet collected: a list of prompt shares, one per
    worker, each with its sampling seed, and per share either its ``ScoredBatch`` (collected, or
    computed in-process) or a Ray reference to it (in flight)."""

    step: int
    shares: list[list[Prompt]]
    seeds: list[int]
    versions: list[int]  # the policy version each share was issued against
    results: list[Any]
    # Seconds the driver spent issuing it: all of the generation in debug mode, which computes
    # at issue time; a few remote calls on Ray. Part of the step's rollout time either way.
    issue_seconds: float = 0.0
    owners: list[Any] = field(default_factory=list)  # on Ray, the fleet.Worker of each share


class Cluster(Protocol):
    def submit_rollout(self, step: int, prompts: list[Prompt]) -> PendingRollout: ...

    def collect(self, pending: PendingRollout) -> ScoredBatch: ...

    def train_step(self, batch: ScoredBatch, objective: str) -> dict[str, float]: ...

    def logprobs(self, batch: ScoredBatch) -> torch.Tensor:
        """[N, T] logprobs of ``batch``'s trained tokens under the learner's current weights,
        in ``batch``'s row order (0 elsewhere); no update. DPO's reference pass, evaluation."""
        ...

    def sync_weights(self) -> SyncStats: ...

    def compare(
        self, prompts: list[str], firsts: list[str], seconds: list[str]
    ) -> tuple[list[float], list[list[float]]]:
        """The RLAIF judge's position-debiased preference of ``firsts[i]`` over ``seconds[i]``
        ([P] margins in [-1, 1], [P][C] per principle; ``JudgeWorker.compare``), judged where
        the judges run. RLAIF labelling; the cluster must have been built with a judge."""
        ...

    def save_state(self, ckpt_dir: Path) -> None: ...

    def load_state(self, ckpt_dir: Path) -> int: ...

    def rng_states(self) -> list[torch.Tensor]: ...

    def load_rng_states(self, states: list[torch.Tensor]) -> None: ...

    def save_pretrained(self, out_dir: Path) -> None: ...

    def placement(self) -> dict[str, list[Any]]: ...

    def fleet_stats(self) -> dict[str, float]:
        """This step's ``fleet/*`` metrics (live rollout workers; joins, losses, drains and
        prompts issued again since the last call); empty in debug mode."""
        ...

    def shutdown(self) -> None: ...


def split_prompts(prompts: list[Prompt], parts: int) -> list[list[Prompt]]:
    """Contiguous, near-equal shares of whole prompt groups (a group never spans workers)."""
    bounds = torch.linspace(0, len(prompts), parts + 1).round().long().tolist()
    return [prompts[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def share_seed(seed: int, step: int, share: int) -> int:
    """Sampling seed of one share: a function of (run seed, step, share) alone, so a share
    issued again (dead worker, resumed run) draws the same completions."""
    return (seed * 1_000_003 + step * 1_009 + share) % 2**63
