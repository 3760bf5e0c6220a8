"""`coordinator curate`: keep the prompts a model sometimes solves.

A prompt the base model always solves, or never does, gives GRPO groups with equal rewards:
no advantage, nothing learned, and its generation wasted. Curating samples `n` completions
per prompt (seeded, as `coordinator eval` does) and writes the others, each with its pass
rate, as a JSONL dataset that `coordinator init --dataset` reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toploc.sampling import SamplingParams
from trainer.evaluate import solved_per_prompt
from trainer.tasks import Task


class CurateError(ValueError):
    """Settings curating cannot work with."""


@dataclass
class Curated:
    rows: list[dict[str, Any]] = field(default_factory=list)
    """The kept prompts: index in the split, prompt, reference columns, pass rate."""
    total: int = 0
    always: int = 0
    never: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "prompts": self.total,
            "kept": len(self.rows),
            "dropped_always_solved": self.always,
            "dropped_never_solved": self.never,
        }


def check_samples(n: int) -> None:
    if n < 2:
        raise CurateError(f"a pass rate strictly between 0 and 1 needs n >= 2, not {n}")


def curate(
    model: Any,
    tokenizer: Any,
    task: Task,
    n: int,
    sampling: SamplingParams,
    max_new_tokens: int,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Curated:
    """Sample `n` completions of each of the first `limit` prompts of `split`; keep those
    solved sometimes but not always."""
    check_samples(n)
    examples = {"test": task.test, "train": task.train}[split][:limit]
    if not examples:
        raise CurateError(f"task {task.name!r} has no {split} examples")
    solved = solved_per_prompt(
        model, tokenizer, task, examples, n, sampling, max_new_tokens, seed, progress=progress
    )
    out = Curated(total=len(examples))
    for i, (e, c) in enumerate(zip(examples, solved, strict=True)):
        if c == n:
            out.always += 1
        elif c == 0:
            out.never += 1
        else:
            row = {"index": i, "prompt": e.prompt, **e.columns, "pass_rate": c / n}
            if e.messages is not None:
                row["messages"] = list(e.messages)
            out.rows.append(row)
    return out


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    """Write the rows whole or not at all (a temporary file renamed over `path`)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
