"""Pool settings known to learn (RL.md), per model preset, and per task for other models.

`coordinator init` starts a pool spec from them (before `--set` overrides), so a new pool works
without tuning (models that are not a preset get size-aware settings: `trainer/sizing.py`);
`local_config` turns a preset into the bare loop's settings (`trainer.local`), so the learning
test and benchmark check exactly what a new pool would run.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"name": "tiny", "dtype": "float32"},
        "task": {"name": "copy", "options": {"digits": 2}},
        "sampling": {"temperature": 1.0, "max_new_tokens": 4, "group_size": 8},
        "algorithm": {"lr": 2e-3, "batch_prompts": 16, "micro_batch": 128, "is_cap": 0.0},
        "limits": {"lease_prompts": 4, "lease_timeout_s": 60.0},
    },
    "smollm2-135m": {
        "model": {"name": "smollm2-135m", "dtype": "bfloat16"},
        "task": {"name": "arithmetic", "options": {"op": "+", "digits": 2}},
        "sampling": {"temperature": 1.0, "max_new_tokens": 16, "group_size": 8},
        "algorithm": {"lr": 1e-5, "batch_prompts": 8, "micro_batch": 16},
        "limits": {"lease_prompts": 2, "lease_timeout_s": 300.0},
    },
}


MAX_NEW_TOKENS: dict[str, int] = {
    "copy": 4,
    "sort": 8,
    "mod_add": 4,
    "arithmetic": 16,
    "gsm8k": 256,
    "dataset": 256,
}
"""Completion length cap per task for models that are not a preset: the procedural answers are
a few tokens; word problems need room for the working (GSM8K solutions run ~100-200 tokens)."""

CHAT_TASKS = ("arithmetic", "gsm8k", "dataset")
"""Tasks with a `chat` option: `coordinator init` sets it from the model's chat template."""


def local_config(preset: str, **budget: float) -> dict[str, Any]:
    """`train_locally`'s settings for a preset, plus a budget (`minutes=` and/or `steps=`)."""
    p = PRESETS[preset]
    return {
        "model": p["model"]["name"],
        "dtype": p["model"]["dtype"],
        "task": p["task"]["name"],
        "options": p["task"]["options"],
        "lr": p["algorithm"]["lr"],
        "prompts": p["algorithm"]["batch_prompts"],
        "group": p["sampling"]["group_size"],
        "max_new_tokens": p["sampling"]["max_new_tokens"],
        **budget,
    }
