"""The GRPO-family policy loss: clipped surrogate, two-sided clipping, four normalisations.

The ratio is pi_theta / pi_behaviour per token, where pi_behaviour is the (validated) logprob of
the weights the node generated with; so policy lag from asynchrony is corrected by the same
clipping that bounds each update. Tokens whose ratio leaves the trust band [1/is_cap, is_cap]
(a very stale or mismatched sample) are masked. Losses are sums divided by a normaliser that is
computed once for the whole batch (`batch_normaliser`), so the losses of micro-batches add up to
the loss of the batch under gradient accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["dapo", "grpo", "dr_grpo", "gspo"]


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
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one (micro-)batch and summed statistics for logging.

    logp, behaviour_logp, mask, ref_logp, entropy: [B, T] (mask is 1 on completion tokens);
    advantages: [B], one per sequence. Returns (loss, stats) where stats are sums over tokens or
    sequences (add them across micro-batches, then divide by the `tokens` / `sequences` counts).
    """
    mask = mask.to(logp.dtype)
    lengths = mask.sum(dim=1).clamp(min=1.0)
    log_ratio = logp - behaviour_logp
    adv = advantages.to(logp.dtype)[:, None]

    if config.loss_type == "gspo":
        # One length-normalised ratio per sequence (GSPO), broadcast over its tokens.
        seq_log_ratio = (log_ratio * mask).sum(dim=1) / lengths
        log_ratio = seq_log_ratio[:, None].expand_as(logp)
    ratio = torch.exp(log_ratio)

    band = torch.ones_like(mask)
    if config.is_cap > 0:
        band = (log_ratio.detach().abs() <= math.log(config.is_cap)).to(mask.dtype)
    live = mask * band

    clipped = ratio.clamp(1 - config.epsilon_low, 1 + config.epsilon_high)
    objective = torch.minimum(ratio * adv, clipped * adv)
    if config.delta > 0:
        objective = torch.where(adv < 0, torch.maximum(objective, config.delta * adv), objective)
    per_token = -objective
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
