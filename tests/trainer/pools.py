"""A coordinator on the `tiny` model and the copy task, for tests that drive it in-process."""

from __future__ import annotations

from typing import Any

from protocol import poolspec
from protocol.identity import Identity
from trainer.config import TrainerConfig
from trainer.coordinator import Coordinator, RunOptions


def tiny_coordinator(
    tmp_path: Any,
    config: TrainerConfig | None = None,
    digits: int = 1,
    max_new_tokens: int = 2,
    max_steps: int | None = None,
    **sections: Any,
) -> Coordinator:
    """A fresh pool key and spec (group size 2), with `sections` (limits, admission, ...)
    merged into the spec, and its coordinator keeping its data in `tmp_path`."""
    key = Identity.generate()
    spec = poolspec.from_dict(
        {
            "name": "t",
            "coordinator": {"public_key": key.public_key.hex()},
            "model": {"name": "tiny", "dtype": "float32"},
            "task": {"name": "copy", "options": {"digits": digits}},
            "sampling": {"group_size": 2, "max_new_tokens": max_new_tokens},
            **sections,
        }
    )
    options = RunOptions(data_dir=tmp_path, max_steps=max_steps)
    return Coordinator(spec, key, options, config)
