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

`coordinator run` also refuses, before loading anything, a model whose full fine-tuning
cannot fit the trainer's device (`check_fits`), with what to do instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from protocol.errors import SwarmError

TRAINING_BYTES_PER_PARAMETER = 16
"""Full fine-tuning: fp32 weights, fp32 gradients and two fp32 AdamW moments (docs/scale.md,
"What fits where"); activations and the staged checkpoint come on top."""
LORA_BYTES_PER_PARAMETER = 4
"""LoRA: the frozen fp32 weights only (FSDP2 shards them over the ranks as it shards a full
model); the adapters' weights, gradients and moments are a few percent of that at ranks up to
64 and are left in the margin with the activations."""


class ModelTooLargeError(SwarmError):
    """The model's training state cannot fit the trainer's device."""


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


def per_parameter(lora: bool) -> int:
    return LORA_BYTES_PER_PARAMETER if lora else TRAINING_BYTES_PER_PARAMETER


def training_bytes(parameters: int, device_type: str, ranks: int, lora: bool = False) -> int:
    """What one device holds for training (full, or `lora` adapters on a frozen base): FSDP2
    shards the state, the frozen base included, over the ranks, one GPU each on CUDA; on a CPU
    every rank lives in this host's memory."""
    total = per_parameter(lora) * parameters
    return math.ceil(total / ranks) if device_type == "cuda" else total


def refuse_oversized(
    model: str,
    parameters: int,
    device_type: str,
    ranks: int,
    available: int,
    lora: bool = False,
) -> None:
    """Raise `ModelTooLargeError`, saying what to do, when the training state of `parameters`
    needs more than `available` bytes of the device."""
    need = training_bytes(parameters, device_type, ranks, lora)
    if need <= available:
        return
    gib = 2**30
    fix = _what_to_do(per_parameter(lora) * parameters, available, device_type, lora)
    what = (
        "LoRA holds its frozen fp32 weights"
        if lora
        else "full fine-tuning holds fp32 weights, gradients and AdamW moments"
    )
    raise ModelTooLargeError(
        f"{model} has {parameters / 1e9:.2f}B parameters: {what}, "
        f"{per_parameter(lora)} bytes each, "
        f"{need / gib:.1f} GiB per {device_type} device with {ranks} trainer rank(s), and "
        f"{available / gib:.1f} GiB is free there. To train it, {fix} "
        '(docs/scale.md, "What fits where").'
    )


def _what_to_do(total: int, available: int, device_type: str, lora: bool) -> str:
    """The ways out for a training state of `total` bytes: more GPUs shard it (more ranks on
    one host do not: they share its memory), and LoRA when it is not LoRA already."""
    if device_type == "cuda":
        ranks_needed = math.ceil(total / available)
        more = (
            f"run the trainer on {ranks_needed} or more GPUs (--trainer-procs {ranks_needed} "
            "shards it with FSDP2), use GPUs with more memory"
        )
    else:
        more = "train on GPUs (--device cuda, --trainer-procs N)"
    if lora:
        return f"{more}, or pick a smaller model"
    return (
        f"{more}, train LoRA adapters (--set trainer.lora.rank=8: {LORA_BYTES_PER_PARAMETER} "
        "bytes per parameter), or pick a smaller model"
    )


def free_memory(device_type: str) -> int:
    """Bytes free now: on the current GPU, or what this host can still give (MemAvailable:
    free pages plus caches it can drop)."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # not Linux: free pages only
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(model: str, device: str, ranks: int, lora: bool = False) -> None:
    """`refuse_oversized` for the pool's model on the configured trainer device, read from
    the model's config alone (no weights are loaded)."""
    from toploc.modelinfo import inspect_model
    from trainer.learner import resolve_device

    device_type = resolve_device(device).type
    parameters = inspect_model(model).parameters
    refuse_oversized(model, parameters, device_type, ranks, free_memory(device_type), lora)
