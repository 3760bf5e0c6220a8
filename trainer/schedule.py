"""The learning rate over a run: a linear warm-up, then constant or a decay to a floor.

`lr_factor` is the multiplier of the base rate at each optimizer step, the function torch's
`LambdaLR` takes. It is a pure function of the step, so a trainer resumed from a checkpoint
(which stores the scheduler's step) picks the schedule up where it stopped, and a new
`algorithm.lr` on restart scales the same curve (`GRPOTrainer.set_lr`).
"""

from __future__ import annotations

import math
from functools import partial

from trainer.config import AlgorithmSection


def lr_factor(
    step: int, warmup: int = 0, decay: str = "constant", decay_steps: int = 0, floor: float = 0.0
) -> float:
    """At optimizer step `step` (0 for the first): (step + 1) / `warmup` during the warm-up;
    then 1 for a constant rate; for a `decay` ("linear" or "cosine"), from 1 right after the
    warm-up down to `floor` at step `decay_steps`, and `floor` from there on."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / (decay_steps - warmup))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * shape


def schedule_of(algorithm: AlgorithmSection) -> partial[float]:
    """`lr_factor` with the settings of an `AlgorithmSection`."""
    return partial(
        lr_factor,
        warmup=algorithm.warmup_steps,
        decay=algorithm.lr_decay,
        decay_steps=algorithm.decay_steps,
        floor=algorithm.min_lr_ratio,
    )
