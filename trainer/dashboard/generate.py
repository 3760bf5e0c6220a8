"""'Try the policy': one bounded completion from the newest published weights (the coordinator
calls `complete`; the limits on who may ask are in `trainer.dashboard.limits`)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from toploc.capture_hf import generate
from toploc.sampling import SamplingParams
from trainer.dashboard.limits import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS


@dataclass(frozen=True)
class Completion:
    version: int
    prompt: str
    completion: str
    tokens: int
    finish_reason: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def complete(
    model: torch.nn.Module,
    tokenizer: Any,
    version: int,
    prompt: str,
    *,
    max_tokens: int,
    sample: bool,
    render: Callable[[str], str] | None,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_token_ids: Sequence[int],
) -> Completion:
    """Complete `prompt` with `model` (weights `version`): greedy, or with the pool's sampler
    (`temperature`, `top_k`, `top_p`) and a fresh seed when `sample`. `render` wraps the prompt
    in the task's template (None: the prompt as given). Blocking: run it in a worker thread."""
    text = render(prompt) if render is not None else prompt
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][-MAX_PROMPT_TOKENS:] or [
        tokenizer.pad_token_id
    ]
    params = SamplingParams(
        temperature=temperature if sample else 0.0,
        top_k=top_k,
        top_p=top_p,
        max_tokens=max(1, min(max_tokens, MAX_NEW_TOKENS)),
        eos_token_ids=tuple(eos_token_ids),
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        rollout = generate(
            model,
            [ids],
            params,
            seeds=[secrets.randbits(62)],
            pad_token_id=tokenizer.pad_token_id or 0,
            capture=False,
        )[0]
    return Completion(
        version=version,
        prompt=text,
        completion=tokenizer.decode(rollout.completion_ids, skip_special_tokens=True),
        tokens=len(rollout.completion_ids),
        finish_reason=rollout.finish_reason,
        seconds=round(time.perf_counter() - t0, 3),
    )
