"""The GRPO-family policy loss: clipped surrogate, two-sided clipping, four normalisations.

Two ways to handle samples from older weights (`off_policy`):

- "behaviour": the ratio is pi_theta / pi_behaviour per token, where pi_behaviour is the
  (validated) logprob of the weights the node generated with; so policy lag from asynchrony is
  corrected by the same clipping that bounds each update. Tokens whose ratio leaves the trust
  band [1/is_cap, is_cap] (a very stale or mismatched sample) are masked.
- "decoupled" (decoupled PPO): the clipped ratio is pi_theta / pi_prox, the trainer's own
  policy at the start of the step, and each token's objective is scaled by the truncated weight
  min(pi_prox / pi_behaviour, tis_cap); tokens whose pi_prox / pi_behaviour leaves
  [icepop_low, icepop_high] are masked (trainer.off_policy). Clipping then bounds only the
  update, not the lag: a stale token that the behaviour ratio would clip still teaches.

Losses are sums divided by a normaliser that is computed once for the whole batch
(`batch_normaliser`), so the losses of micro-batches add up to the loss of the batch under
gradient accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from trainer.off_policy import icepop_band, truncated_is_weights

OffPolicy = Literal["behaviour", "decoupled"]
LossType = Literal["dapo", "grpo", "dr_grpo", "gspo"]


class LossConfigError(ValueError):
    """Loss settings that cannot work together."""


@dataclass(frozen=True)
class LossConfig:
    loss_type: LossType = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    delta: float = 4.0
    """Cap of the ratio for negative advantages (INTELLECT-2's two-sided clipping); 0 disables."""
    beta: float = 0.0
    entropy_coef: float = 0.0
    is_cap: float = 4.0
    max_completion_len: int = 1
    """Dr. GRPO divides by this (the sampling length cap) instead of each sequence's length."""
    off_policy: OffPolicy = "behaviour"
    tis_cap: float = 2.0
    """decoupled: truncation C of the weight pi_prox / pi_behaviour; 0 leaves it untruncated."""
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    """decoupled: tokens whose pi_prox / pi_behaviour leaves [icepop_low, icepop_high] are masked;
    0 turns that edge off."""

    def __post_init__(self) -> None:
        if self.off_policy not in ("behaviour", "decoupled"):
            raise LossConfigError(
                f"off_policy must be behaviour or decoupled, not {self.off_policy!r}"
            )
        for name in ("tis_cap", "icepop_low", "icepop_high", "is_cap"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise LossConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if 0 < self.icepop_high <= self.icepop_low:
            raise LossConfigError(
                f"icepop_low ({self.icepop_low}) must be below icepop_high ({self.icepop_high})"
            )


def batch_normaliser(config: LossConfig, mask: torch.Tensor) -> float:
    """The denominator of the loss for a whole batch, from its completion mask [B, T]."""
    if config.loss_type == "dapo":
        return max(float(mask.sum()), 1.0)
    if config.loss_type == "dr_grpo":
        return float(mask.shape[0] * config.max_completion_len)
    return float(mask.shape[0])  # grpo, gspo: a mean over sequences


def policy_loss(
    logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    normaliser: float,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    prox_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one (micro-)batch and summed statistics for logging.

    logp, behaviour_logp, mask, ref_logp, entropy, prox_logp: [B, T] (mask is 1 on completion
    tokens); advantages: [B], one per sequence. prox_logp (the trainer's logprobs at the start of
    the step) is needed by off_policy = "decoupled" only. Returns (loss, stats) where stats are
    sums over tokens or sequences (add them across micro-batches, then divide by the `tokens` /
    `sequences` / `live_tokens` counts).
    """
    mask = mask.to(logp.dtype)
    lengths = mask.sum(dim=1).clamp(min=1.0)
    decoupled = config.off_policy == "decoupled"
    if decoupled:
        if prox_logp is None:
            raise ValueError('off_policy = "decoupled" needs the proximal logprobs')
        prox_logp = prox_logp.detach()
        log_ratio = logp - prox_logp
        weight = truncated_is_weights(prox_logp, behaviour_logp, config.tis_cap)
        band = icepop_band(prox_logp, behaviour_logp, config.icepop_low, config.icepop_high)
    else:
        log_ratio = logp - behaviour_logp
        weight = torch.ones_like(mask)
        band = torch.ones_like(mask)
        if config.is_cap > 0:
            band = (log_ratio.detach().abs() <= math.log(config.is_cap)).to(mask.dtype)
    adv = advantages.to(logp.dtype)[:, None]

    if config.loss_type == "gspo":
        # One length-normalised ratio per sequence (GSPO), broadcast over its tokens.
        seq_log_ratio = (log_ratio * mask).sum(dim=1) / lengths
        log_ratio = seq_log_ratio[:, None].expand_as(logp)
    ratio = torch.exp(log_ratio)
    live = mask * band

    clipped = ratio.clamp(1 - config.epsilon_low, 1 + config.epsilon_high)
    objective = torch.minimum(ratio * adv, clipped * adv)
    if config.delta > 0:
        objective = torch.where(adv < 0, torch.maximum(objective, config.delta * adv), objective)
    per_token = -weight * objective
    kl = None
    if config.beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's logprobs")
        # k3 estimator of KL(pi_theta || pi_ref): non-negative, unbiased, low variance.
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + config.beta * kl
    if config.entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs per-token entropies")
        per_token = per_token - config.entropy_coef * entropy

    if config.loss_type in ("grpo", "gspo"):
        per_sequence = (per_token * live).sum(dim=1) / lengths
        loss = per_sequence.sum() / normaliser
    else:  # dapo, dr_grpo
        loss = (per_token * live).sum() / normaliser

    with torch.no_grad():
        r = ratio.detach()
        stats = {
            "tokens": float(mask.sum()),
            "sequences": float(mask.shape[0]),
            "masked_tokens": float((mask * (1 - band)).sum()),
            "icepop_masked_tokens": float((mask * (1 - band)).sum()) if decoupled else 0.0,
            "live_tokens": float(live.sum()),
            "tis_weight_sum": float((weight * live).sum()),
            "clipped_low_tokens": float((mask * ((r < 1 - config.epsilon_low) & (adv < 0))).sum()),
            "clipped_high_tokens": float(
                (mask * ((r > 1 + config.epsilon_high) & (adv > 0))).sum()
            ),
            "ratio_sum": float((r * mask).sum()),
            "ratio_max": float(torch.where(mask > 0, r, torch.zeros_like(r)).max()),
            "kl_sum": float((kl.detach() * mask).sum()) if kl is not None else 0.0,
            "entropy_sum": float((entropy * mask).sum()) if entropy is not None else 0.0,
        }
    return loss, stats
