"""Per-peer request rate limits: one token bucket per key, bounded memory.

A bucket starts full (`burst` tokens) and refills at `rate` tokens per second. A request takes
one token; without one it is refused with the time until the next token, so the peer can be
told when to come back rather than left guessing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class TokenBucket:
    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 when granted, else the seconds until one will be available."""
        # A clock that steps back must not mint tokens, hence max().
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = max(self.last, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """Token buckets keyed by peer, at most `max_peers` of them (least recently used go first).

    Forgetting a peer refills its bucket, so eviction only ever errs towards letting a request
    through; with `max_peers` well above the number of live peers that costs nothing.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        max_peers: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.max_peers = max_peers
        self.clock = clock
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        TokenBucket(self.rate, self.burst, 0.0)  # validate the parameters now, not on first use

    def check(self, peer: Hashable) -> float:
        """0.0 when `peer` may make a request now, else the seconds it should wait."""
        now = self.clock()
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = TokenBucket(self.rate, self.burst, now)
            while len(self._buckets) > self.max_peers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(peer)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
