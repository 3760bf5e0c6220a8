"""Default pool settings by model size, for models that are not a measured preset.

A learning rate right for a 1M-parameter random model (2e-3) wrecks a pretrained 0.5B one, and
one right for 7B (1e-6) teaches a 135M model nothing in an afternoon, so `coordinator init`
picks by parameter count and prints the class it chose. docs/models-and-data.md gives the
table and where each number comes from:

- up to 20M parameters: small test models, usually randomly initialised; the `tiny` preset's
  measured settings (RL.md: copy/sort learn at lr 1e-3 to 2e-3), fp32.
- 20M-300M: SmolLM2-135M's measured settings (lr 1e-5, 8 prompts x 8, bf16).
- 300M-3B: TRL's GRPO default learning rate (1e-6) with a larger batch; Qwen2.5-0.5B/1.5B.
- 3B-15B and above: lr 1e-6 down to 5e-7, short micro-batches (memory), longer leases.

Every value is a starting point written into the pool file, where `--set` or
`coordinator run --set algorithm.lr=...` changes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SizeClass:
    name: str
    up_to: float
    """Parameters, exclusive upper bound."""
    dtype: str
    lr: float
    batch_prompts: int
    micro_batch: int
    group_size: int
    lease_prompts: int
    lease_timeout_s: float


SIZE_CLASSES: tuple[SizeClass, ...] = (
    SizeClass("test-scale (<20M)", 20e6, "float32", 1e-3, 16, 64, 8, 4, 60.0),
    SizeClass("small (20M-300M)", 300e6, "bfloat16", 1e-5, 8, 16, 8, 2, 300.0),
    SizeClass("medium (300M-3B)", 3e9, "bfloat16", 1e-6, 16, 8, 8, 2, 600.0),
    SizeClass("large (3B-15B)", 15e9, "bfloat16", 1e-6, 32, 4, 8, 1, 900.0),
    SizeClass("very large (>=15B)", float("inf"), "bfloat16", 5e-7, 32, 2, 8, 1, 1800.0),
)


def size_class(parameters: int) -> SizeClass:
    return next(c for c in SIZE_CLASSES if parameters < c.up_to)


def defaults_for(parameters: int) -> tuple[SizeClass, dict[str, Any]]:
    """The size class of a model and the pool-file tables it starts from."""
    c = size_class(parameters)
    return c, {
        "model": {"dtype": c.dtype},
        "sampling": {"group_size": c.group_size},
        "algorithm": {"lr": c.lr, "batch_prompts": c.batch_prompts, "micro_batch": c.micro_batch},
        "limits": {"lease_prompts": c.lease_prompts, "lease_timeout_s": c.lease_timeout_s},
    }
