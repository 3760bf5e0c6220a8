"""'Try the policy': one bounded completion from the newest published weights."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from toploc.capture_hf import generate
from toploc.sampling import SamplingParams
from trainer.tasks import Example

if TYPE_CHECKING:
    from trainer.coordinator import Coordinator

MAX_NEW_TOKENS = 64
MAX_PROMPT_TOKENS = 512


class RateLimiter:
    """A token bucket per client: `burst` requests at once, then one every `every_s` seconds."""

    def __init__(self, every_s: float = 2.0, burst: int = 3, max_clients: int = 10_000) -> None:
        self.every_s = every_s
        self.burst = burst
        self.max_clients = max_clients
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, client: str, now: float | None = None) -> float:
        """0 if `client` may go now (and charge it), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) / self.every_s)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                return (1.0 - tokens) * self.every_s
            if len(self._buckets) >= self.max_clients and client not in self._buckets:
                self._buckets.clear()  # a flood of addresses: forget, rather than grow
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0


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
    coord: Coordinator, prompt: str, max_tokens: int, sample: bool, template: bool
) -> Completion | None:
    """Complete `prompt` with the newest published version (greedy, or the pool's sampler with
    a fresh seed); None before any version is published. Runs in a worker thread."""
    latest = coord.policy.latest_model()
    if latest is None:
        return None
    version, model = latest
    tok = coord.tokenizer
    text = coord.task.render(Example(prompt, {}), tok) if template else prompt
    ids = tok(text, add_special_tokens=False)["input_ids"][-MAX_PROMPT_TOKENS:] or [
        tok.pad_token_id
    ]
    spec = coord.spec.sampling
    params = SamplingParams(
        temperature=spec.temperature if sample else 0.0,
        top_k=spec.top_k,
        top_p=spec.top_p,
        max_tokens=max(1, min(max_tokens, MAX_NEW_TOKENS)),
        eos_token_ids=tuple(getattr(coord, "eos", ()) or ()),
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        rollout = generate(
            model,
            [ids],
            params,
            seeds=[secrets.randbits(62)],
            pad_token_id=tok.pad_token_id or 0,
            capture=False,
        )[0]
    return Completion(
        version=version,
        prompt=text,
        completion=tok.decode(rollout.completion_ids, skip_special_tokens=True),
        tokens=len(rollout.completion_ids),
        finish_reason=rollout.finish_reason,
        seconds=round(time.perf_counter() - t0, 3),
    )
