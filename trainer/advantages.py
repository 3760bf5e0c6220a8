"""Group-relative advantages (GRPO and its variants)."""

from __future__ import annotations

from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]
_EPS = 1e-4


def group_advantages(
    rewards: torch.Tensor, scale_rewards: ScaleRewards = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages for `rewards` of shape [groups, G]: reward minus its group's mean, optionally
    divided by the group's std ("group"), the whole batch's std ("batch"), or not ("none", as in
    Dr. GRPO). Returns (advantages [groups, G], keep [groups]) where `keep` is False for groups
    whose rewards are all equal: they carry no signal and are dropped (DAPO dynamic sampling).
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G] with G >= 2, got {tuple(rewards.shape)}")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    group_std = rewards.std(dim=1, keepdim=True)
    keep = group_std.squeeze(1) > 0
    if scale_rewards == "group":
        centred = centred / (group_std + _EPS)
    elif scale_rewards == "batch":
        centred = centred / (rewards.std() + _EPS)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale_rewards!r}")
    return centred, keep


def batch_scaled_advantages(groups: list[list[float]]) -> list[torch.Tensor]:
    """`group_advantages(..., "batch")` for groups of any sizes (`sampling.max_group_size`):
    each reward minus its group's mean, divided by the std of every reward in the batch."""
    scale = torch.tensor([r for g in groups for r in g], dtype=torch.float32).std() + _EPS
    out = []
    for rewards in groups:
        row = torch.tensor(rewards, dtype=torch.float32)
        out.append((row - row.mean()) / scale)
    return out
