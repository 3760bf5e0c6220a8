"""The upload cap (`UploadThrottle`) on trio's autojump clock: the rate, who sends next,
the starvation guard, cancellation."""

from __future__ import annotations

import contextlib
import random

import pytest
import trio

from shardcast.throttle import STARVED_S, TURN_SLICE, WHOLE_TURNS_S, Sending, UploadThrottle

RATE = 1000.0  # bytes/s
CHUNK = 100


async def _send(cap: UploadThrottle, chunks: int, since: float, done: dict, name: str) -> None:
    for _ in range(chunks):
        await cap.take(CHUNK, since)
        await trio.sleep(0)  # the chunk goes out; the next sender pays meanwhile
    done[name] = trio.current_time()


@pytest.mark.trio
async def test_the_oldest_stream_finishes_first_at_the_full_rate(autojump_clock) -> None:
    """Four streams of 5 chunks, begun in order, finish in that order, two at a time at
    the full rate: the cap goes to the oldest stream waiting, and while one sends the chunk
    it paid for, the next oldest pays for its own. The first two are done by 1 s and the
    last two by 2 s, where turns shared alike had all four finish near 2 s. The total never
    runs ahead of the rate."""
    cap = UploadThrottle(RATE, burst=0.0)
    done: dict[str, float] = {}
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(_send, cap, 5, t0 + i * 0.001, done, f"s{i}")
            await trio.sleep(0.001)
    finish = [done[f"s{i}"] - t0 for i in range(4)]
    assert finish == sorted(finish)
    assert finish[1] == pytest.approx(1.0, abs=0.02), finish
    assert finish[3] == pytest.approx(2.0, abs=0.02), finish
    assert 4 * 5 * CHUNK / (max(finish)) <= RATE * 1.001


@pytest.mark.trio
async def test_a_sender_without_a_stream_waits_behind_those_waiting(autojump_clock) -> None:
    """`since=None` (the NAT hop's circuits) is a place after every sender waiting now:
    turns in the order asked, as the cap always gave them."""
    cap = UploadThrottle(RATE, burst=0.0)
    order: list[str] = []

    async def one(name: str) -> None:
        await cap.take(CHUNK)
        order.append(name)

    async with trio.open_nursery() as nursery:
        for name in "abcd":
            nursery.start_soon(one, name)
            await trio.sleep(0.001)
    assert order == list("abcd")


@pytest.mark.trio
async def test_a_stream_starved_behind_a_long_one_is_served_within_the_guard(
    autojump_clock,
) -> None:
    """Two streams begun first, with far more to send than `STARVED_S` of the rate, hold
    the cap between them, but a later one still gets a turn once it has waited `STARVED_S`,
    and again each time it has waited that long: never silent for much longer."""
    cap = UploadThrottle(RATE, burst=0.0)
    long_chunks = int(4 * STARVED_S * RATE / CHUNK)
    turns: list[float] = []
    t0 = trio.current_time()

    async def late() -> None:
        await trio.sleep(0.05)
        for _ in range(3):
            await cap.take(CHUNK, t0 + 0.05)
            turns.append(trio.current_time() - t0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send, cap, long_chunks, t0, {}, "long")
        nursery.start_soon(_send, cap, long_chunks, t0 + 0.001, {}, "long too")
        nursery.start_soon(late)
        await trio.sleep(3.5 * STARVED_S)
        nursery.cancel_scope.cancel()
    assert len(turns) == 3
    gaps = [b - a for a, b in zip([0.05, *turns[:-1]], turns, strict=True)]
    for gap in gaps:
        assert STARVED_S <= gap <= STARVED_S + 2 * CHUNK / RATE + 0.01, gaps


@pytest.mark.trio
async def test_a_cancelled_sender_leaves_the_cap_to_the_others(autojump_clock) -> None:
    """A sender cancelled while it waits (its client went away), or as it pays, neither
    holds the cap nor loses a place for anyone: the others all finish, at the rate."""
    cap = UploadThrottle(RATE, burst=0.0)
    done: dict[str, float] = {}
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send, cap, 5, t0, done, "a")
        await trio.sleep(0.001)
        with trio.move_on_after(0.15):  # cancelled while it pays for its first chunk
            await cap.take(CHUNK, t0 - 1.0)
        with trio.move_on_after(0.05):  # cancelled while it waits
            await cap.take(CHUNK, t0 + 1.0)
        nursery.start_soon(_send, cap, 5, t0 + 0.01, done, "b")
    assert set(done) == {"a", "b"}
    assert max(done.values()) - t0 <= 10 * CHUNK / RATE + 0.2
    assert cap.waiting == 0


def test_a_cap_gives_whole_turns_only_while_a_round_of_them_is_short() -> None:
    """A turn is a whole send while one for every stream under the cap takes at most
    `WHOLE_TURNS_S`, and `TURN_SLICE` past that; a stream is counted only inside
    `Sending.stream()`, an error included."""
    whole = 2**20
    cap = UploadThrottle(rate=10 * whole)  # a whole round fits 20 streams
    fits = int(WHOLE_TURNS_S * cap.rate / whole)
    sending = Sending()
    with contextlib.ExitStack() as stack:
        for _ in range(fits):
            stack.enter_context(sending.stream())
        assert cap.turn(whole, sending.count) == whole
        with sending.stream():
            assert sending.count == fits + 1 and cap.turn(whole, sending.count) == TURN_SLICE
        slow = UploadThrottle(rate=1000)
        assert slow.turn(1000, 3) == 1000  # a round takes 3 s, but a short send stays whole
    with pytest.raises(RuntimeError), sending.stream():
        raise RuntimeError("the client went away")
    assert sending.count == 0


@pytest.mark.trio
async def test_many_waiters_some_gone_are_served_by_age(autojump_clock) -> None:
    """Forty senders queued behind a holder, their streams' ages shuffled, every third one
    cancelled while it waits: the rest get the cap in the order their streams began, and
    nothing is left waiting."""
    cap = UploadThrottle(RATE, burst=0.0)
    rng = random.Random(7)
    ages = [float(i) for i in range(40)]
    rng.shuffle(ages)
    served: list[float] = []

    async def one(since: float, scope: trio.CancelScope) -> None:
        with scope:
            await cap.take(CHUNK, since)
            served.append(since)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cap.take, 5 * CHUNK)  # holds the cap for 0.5 s
        await trio.sleep(0.001)
        scopes = []
        for since in ages:
            scopes.append(trio.CancelScope())
            nursery.start_soon(one, since, scopes[-1])
        await trio.sleep(0.01)
        assert cap.waiting == 40
        for i, scope in enumerate(scopes):
            if i % 3 == 0:
                scope.cancel()
    kept = sorted(a for i, a in enumerate(ages) if i % 3)
    assert served == kept
    assert cap.waiting == 0
