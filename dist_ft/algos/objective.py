"""What a learner step optimises. One enum value per objective; its loss is a pure function in
``algos/`` and its normaliser an additive count, so the learner group can sum it across ranks.
"""

from __future__ import annotations

import enum


class Objective(str, enum.Enum):
    GRPO = "grpo"  # the clipped policy loss of algos/grpo.py on scored samples (LossType variant)
    SFT = "sft"  # NLL of the trained tokens, algos/sft.py (the demo's format warm-up uses it)
    # preference pairs, algos/dpo.py (DPOLoss variant): each group is one pair, its first row
    # the chosen answer and its second the rejected one; reference logprobs come in the batch
    DPO = "dpo"

    @property
    def whole_groups(self) -> bool:
        """The loss couples the samples of a group (a DPO pair): ranks and micro-batches must
        never split one."""
        return self is Objective.DPO
