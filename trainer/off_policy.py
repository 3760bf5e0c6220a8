"""Off-policy pieces of the loss: truncated importance weights, the IcePop band, and the
trainer-node mismatch.

Nodes sample with weights that lag the trainer (asynchrony) and with kernels that differ from
the trainer's (bf16, KV cache), so the behaviour policy pi_behaviour that produced a token is
not the trainer's proximal policy pi_prox (its weights at the start of the step). Decoupled PPO
takes the clipped ratio against pi_prox and corrects for the gap with the per-token weight
pi_prox / pi_behaviour, truncated at a cap (TIS), and drops tokens whose weight leaves a band
(IcePop): those are too far off-policy for a bounded weight to fix. All inputs are logprobs.
"""

from __future__ import annotations

import math

import torch


def truncated_is_weights(
    prox_logp: torch.Tensor, behaviour_logp: torch.Tensor, cap: float
) -> torch.Tensor:
    """min(pi_prox / pi_behaviour, cap) per token, without gradient; cap 0: not truncated."""
    w = torch.exp((prox_logp - behaviour_logp).detach())
    return w.clamp(max=cap) if cap > 0 else w


def icepop_band(
    prox_logp: torch.Tensor, behaviour_logp: torch.Tensor, low: float, high: float
) -> torch.Tensor:
    """1.0 where low <= pi_prox / pi_behaviour <= high (edges kept), else 0.0. Compared in log
    space, so a ratio of exactly `low` or `high` stays in; 0 turns that edge off."""
    gap = (prox_logp - behaviour_logp).detach()
    keep = torch.ones_like(gap, dtype=torch.bool)
    if low > 0:
        keep &= gap >= math.log(low)
    if high > 0:
        keep &= gap <= math.log(high)
    return keep.to(prox_logp.dtype)


def mismatch_kl_sum(
    node_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor
) -> float:
    """Summed k3 estimate of KL(pi_node || pi_trainer) over the tokens under `mask`.

    The tokens were sampled by the node, so with d = logp_trainer - logp_node the per-token
    estimate exp(d) - d - 1 is unbiased for that KL and never negative (the plain mean of
    logp_node - logp_trainer is unbiased too, but noisy tokens of either sign cancel, which
    would hide a mismatch). Divide by mask.sum() for the mean.
    """
    d = (trainer_logp - node_logp).detach().double()
    return float(((torch.exp(d) - d - 1) * mask.double()).sum())
