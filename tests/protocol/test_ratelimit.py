"""Token buckets and cutoffs with a fake clock: burst, refill, retry hints, independence,
bounded memory."""

from __future__ import annotations

import pytest

from protocol.ratelimit import Cutoff, RateLimiter, TokenBucket


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


def test_a_peer_that_keeps_collecting_refusals_is_cut_off_for_a_while():
    clock = Clock()
    cutoff = Cutoff(strikes=3.0, strike_rate=0.5, cutoff_s=10.0, clock=clock)
    assert [cutoff.strike("a") for _ in range(3)] == [False, False, False]
    assert not cutoff.cut_off("a")
    assert cutoff.strike("a")  # the fourth at once: cut off
    assert cutoff.cut_off("a") and not cutoff.cut_off("b")
    clock.now += 5.0
    assert not cutoff.strike("a")  # strikes refilled meanwhile; still cut off, not a new cutoff
    assert cutoff.cut_off("a")
    clock.now += 5.0
    assert not cutoff.cut_off("a")  # served again once the cutoff ran out


def test_a_refusal_now_and_then_never_cuts_off_and_memory_is_bounded():
    clock = Clock()
    cutoff = Cutoff(strikes=3.0, strike_rate=0.5, cutoff_s=10.0, max_peers=2, clock=clock)
    for _ in range(100):  # one refusal every 2 s: what a peer that waits as told collects
        assert not cutoff.strike("a")
        clock.now += 2.0
    for peer in "bcde":
        for _ in range(4):
            cutoff.strike(peer)
    assert not cutoff.cut_off("b") and cutoff.cut_off("e")  # the oldest cutoffs were forgotten
