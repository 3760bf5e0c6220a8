"""The group algorithm: which accepted groups train, and with what advantages.

It runs once per accepted group, when the verdict is recorded, and the ledger stores what it
decided: the trainer trains on exactly the stored advantages and the dashboard shows them, so
nothing is recomputed. Groups whose rewards are all equal carry no signal and are dropped on
the spot (DAPO's dynamic sampling). With `scale_rewards = "batch"` the stored advantages are
centred only; `batch` divides them by the batch's reward std when a batch is formed, and
the step records the values it trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from trainer.advantages import ScaleRewards, batch_scaled_advantages, group_advantages
from trainer.grpo import TrainGroup

FLAT = "zero reward variance"


@dataclass(frozen=True)
class GroupScore:
    advantages: list[float]
    dropped: str | None
    """Why the group does not train (None: it does)."""


class GroupAlgorithm:
    def __init__(self, scale_rewards: ScaleRewards) -> None:
        self.scale_rewards = scale_rewards

    def score(self, rewards: list[float]) -> GroupScore:
        """Advantages of one group of G >= 2 rewards, or why it is dropped."""
        per_group = "none" if self.scale_rewards == "batch" else self.scale_rewards
        adv, keep = group_advantages(torch.tensor([rewards]), per_group)
        if not bool(keep[0]):
            return GroupScore([0.0] * len(rewards), FLAT)
        return GroupScore([round(float(a), 6) for a in adv[0]], None)

    def batch(self, groups: list[TrainGroup]) -> list[TrainGroup]:
        """The groups as a batch trains on them: their stored advantages, or under batch
        scaling the centred rewards divided by the batch's reward std."""
        if self.scale_rewards != "batch":
            return groups
        scaled = batch_scaled_advantages([g.rewards for g in groups])
        return [
            replace(g, advantages=[round(float(a), 6) for a in row])
            for g, row in zip(groups, scaled, strict=True)
        ]
