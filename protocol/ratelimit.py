"""Per-peer request rate limits: one token bucket per key, bounded memory.

A bucket starts full (`burst` tokens) and refills at `rate` tokens per second. A request takes
one token; without one it is refused with the time until the next token, so the peer can be
told when to come back rather than left guessing. A peer that does not come back when told
is cut off for a while (`Cutoff`).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


def client_key(host: str) -> str:
    """Who a rate limit counts: the address, or its /64 for IPv6 (one host usually holds a
    whole /64, so counting single addresses would hand it 2^64 buckets). An IPv4 address
    seen through an IPv6 socket (::ffff:a.b.c.d) counts as itself, not as one /64 for all."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (a name is not counted as one)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


class Cutoff:
    """Peers that keep sending while refused, cut off for a while.

    A refusal for rate costs the refusing host nearly what serving would: the peer opened a
    stream, negotiated the protocol and sent a frame before the limiter could say no (about
    5 ms of a core per request in py-libp2p, measured by bench/flood.py). A peer that
    honours `retry_after_s` collects a refusal now and then; one that ignores it collects them as
    fast as it can send. Each refusal is a strike, `strikes` at once at most (refilled at
    `strike_rate` per second); the strike past those cuts the peer off for `cutoff_s`, during
    which its new streams are reset before negotiation."""

    def __init__(
        self,
        strikes: float = 40.0,
        strike_rate: float = 0.5,
        cutoff_s: float = 10.0,
        max_peers: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cutoff_s = cutoff_s
        self.max_peers = max_peers
        self.clock = clock
        self._strikes = RateLimiter(strike_rate, strikes, max_peers, clock)
        self._until: OrderedDict[Hashable, float] = OrderedDict()

    def strike(self, peer: Hashable) -> bool:
        """Count one refusal; True when it cut off a peer that was not cut off. A strike
        during a cutoff (a request on a stream opened before it) extends it."""
        if self._strikes.check(peer) == 0.0:
            return False
        return self.cut(peer)

    def cut(self, peer: Hashable) -> bool:
        """Cut `peer` off now for `cutoff_s`, strikes or not (a proven protocol violation);
        True when it was not cut off already."""
        fresh = not self.cut_off(peer)
        self._until[peer] = self.clock() + self.cutoff_s
        self._until.move_to_end(peer)
        while len(self._until) > self.max_peers:
            self._until.popitem(last=False)
        return fresh

    def cut_off(self, peer: Hashable) -> bool:
        """Whether `peer`'s new streams are refused now."""
        until = self._until.get(peer)
        if until is None:
            return False
        if self.clock() < until:
            return True
        del self._until[peer]
        return False
