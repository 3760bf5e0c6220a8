"""Token buckets with a fake clock: burst, refill, retry hints, independence, bounded memory."""

from __future__ import annotations

import pytest

from protocol.ratelimit import RateLimiter, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill_with_retry_hint():
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3.0, clock=clock)
    assert [limiter.check("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.check("a") == pytest.approx(0.5)
    clock.now += 0.25
    assert limiter.check("a") == pytest.approx(0.25)  # half a token back, half still missing
    clock.now += 0.25
    assert limiter.check("a") == 0.0
    assert limiter.check("a") > 0


def test_peers_are_independent_and_memory_is_bounded():
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=1.0, max_peers=3, clock=clock)
    assert limiter.check("a") == 0.0
    assert limiter.check("a") > 0
    assert limiter.check("b") == 0.0  # a's refusal costs b nothing
    for peer in "cdef":
        limiter.check(peer)
    assert len(limiter) == 3


def test_clock_going_back_mints_no_tokens_and_bad_parameters_are_refused():
    bucket = TokenBucket(rate=1.0, burst=1.0, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(5.0) > 0  # clock stepped back
    assert bucket.take(10.5) > 0  # still not a full second after the last take
    assert bucket.take(11.0) == 0.0
    with pytest.raises(ValueError):
        RateLimiter(rate=0.0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1.0, burst=0.5, now=0.0)
