"""The limits on 'try the policy': who may ask how often, and how much one request may ask
for. No torch here: the API imports this, the coordinator runs the model."""

from __future__ import annotations

import threading
import time

MAX_NEW_TOKENS = 64
MAX_PROMPT_TOKENS = 512


class RateLimiter:
    """A token bucket per client: `burst` requests at once, then one every `every_s` seconds.

    The table holds at most `max_clients` buckets; past that the least recently charged one is
    forgotten. Forgetting a bucket idle for `burst * every_s` loses nothing (it was full again);
    only a flood of more clients than that within that time gives the oldest a fresh burst.
    """

    def __init__(self, every_s: float = 2.0, burst: int = 3, max_clients: int = 10_000) -> None:
        self.every_s = every_s
        self.burst = burst
        self.max_clients = max_clients
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # insertion order = last charged

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, client: str, now: float | None = None) -> float:
        """0 if `client` may go now (and charge it), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) / self.every_s)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) * self.every_s
            self._buckets[client] = (tokens - 1.0 if wait == 0.0 else tokens, now)
            while len(self._buckets) > self.max_clients:
                del self._buckets[next(iter(self._buckets))]
            return wait


MAX_WAITING = 4
"""Generations that may wait for the one running; past that a caller is turned away at once
instead of holding a connection and a queue slot for as long as the queue takes."""
