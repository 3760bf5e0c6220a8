"""Pool settings known to learn (RL.md), per model preset.

`coordinator init` starts a pool spec from them (before `--set` overrides), so a new pool works
without tuning; `local_config` turns one into the bare loop's settings (`trainer.local`), so the
learning test and benchmark check exactly what a new pool would run.
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
