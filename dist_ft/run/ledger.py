"""The sample ledger: what was issued, what was trained, at which policy version.

Every sample is named by ``(step, prompt index, completion index)``: the step that issued its
prompt, the prompt's row in the dataset, and its place in the group. Ray delivers actor results
at least once and lost groups are issued again, so the learner admits each id once; it also
refuses samples older than the staleness bound. ``ledger.jsonl`` in the run directory lists every
trained sample with its generating version and the learner version it was trained at, and under
``peft.adapters`` the adapter each step trained (the one that generated its samples).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dist_ft.wire.batch import ScoredBatch

SampleId = tuple[int, int, int]


class Ledger:
    def __init__(
        self, path: Path, group_size: int, fresh: bool, adapters: list[str] | None = None
    ) -> None:
        """``fresh``: a new run, whose ``ledger.jsonl`` starts empty; a resumed run keeps it
        (``load_state_dict`` drops the rows logged after its checkpoint). ``adapters``: the
        names of ``peft.adapters``, which a row's ``adapter`` column names."""
        self.path = path
        self.adapters = adapters or []
        if fresh:
            path.write_text("")
        self.group_size = group_size
        self.issued: dict[int, list[int]] = {}  # step -> prompt indices issued for it
        self.trained: set[SampleId] = set()
        self.duplicates = 0  # samples that arrived again and were dropped
        self.too_stale = 0  # samples dropped for exceeding grpo.max_staleness

    def issue(self, step: int, prompt_indices: list[int]) -> None:
        self.issued[step] = list(prompt_indices)

    def admit(
        self, batch: ScoredBatch, learner_version: int, max_staleness: int
    ) -> tuple[ScoredBatch, dict[str, float]]:
        """The samples of ``batch`` the learner may train on now, and what was dropped.

        A sample is dropped when its id was trained before (or repeats within the batch), or
        when it was generated more than ``max_staleness`` versions before ``learner_version``.
        """
        keep, seen = [], set()
        duplicates = stale = 0
        for i, (sid, version) in enumerate(
            zip(map(tuple, batch.sample_ids.tolist()), batch.versions.tolist())
        ):
            if sid in self.trained or sid in seen:
                duplicates += 1
            elif learner_version - version > max_staleness:
                stale += 1
            else:
                seen.add(sid)
                keep.append(i)
        self.duplicates += duplicates
        self.too_stale += stale
        staleness = (learner_version - batch.versions).float()
        stats = {
            "ledger/duplicates": float(duplicates),
            "ledger/too_stale": float(stale),
            "staleness/mean": float(staleness.mean()),
            "staleness/max": float(staleness.max()),
        }
        for s in range(max_staleness + 1):
            stats[f"staleness/share_{s}"] = float((staleness == s).float().mean())
        return (batch if len(keep) == len(batch) else batch.select(keep)), stats

    def record(self, step: int, batch: ScoredBatch, learner_version: int) -> None:
        """Mark ``batch`` as trained at ``learner_version`` (the version before the update)."""
        ids = [tuple(x) for x in batch.sample_ids.tolist()]
        self.trained.update(ids)
        row: dict[str, Any] = {"step": step, "learner_version": learner_version}
        if batch.adapter_ids is not None:  # one adapter a step (peft.adapters)
            row["adapter"] = sorted({self.adapters[i] for i in batch.adapter_ids.tolist()})
        row["samples"] = [[*sid, v] for sid, v in zip(ids, batch.versions.tolist())]
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def lost(self, through_step: int) -> list[SampleId]:
        """Issued samples of steps <= ``through_step`` that were never trained."""
        return sorted(
            (step, p, c)
            for step, prompts in self.issued.items()
            if step <= through_step
            for p in prompts
            for c in range(self.group_size)
            if (step, p, c) not in self.trained
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "issued": {str(k): v for k, v in self.issued.items()},
            "trained": sorted(self.trained),
            "duplicates": self.duplicates,
            "too_stale": self.too_stale,
        }

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """Restore the ledger of a checkpoint taken after ``step``; later rows of ledger.jsonl
        (trained after the checkpoint, by the run that died) are dropped from the file."""
        self.issued = {int(k): v for k, v in state["issued"].items()}
        self.trained = {tuple(x) for x in state["trained"]}  # type: ignore[misc]
        self.duplicates, self.too_stale = state["duplicates"], state["too_stale"]
        truncate_jsonl(self.path, step)


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop rows logged for steps after ``step`` (a resumed run logs them again)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
