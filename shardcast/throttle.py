"""Upload throttle shared by every connection of one server: caps its total upload rate.

Used by benchmarks to model "this relay has U bytes/s of upload" on one machine, and by
operators who must not saturate a link. One sender at a time holds the cap: it takes tokens
for its chunk, waits until its debt is paid, and hands the cap on (sending its chunk while
the next one pays), so senders together never exceed the rate.

The cap goes next to the waiting sender whose stream began first, so the oldest transfers
finish at the full rate, one pair after another (while one sends the chunk it paid for, the
next oldest pays for its own), rather than every transfer crawling along at once. In a swarm
that is what matters: a member re-serves a piece only once all of it has arrived and been
verified. 32 members sharing a 1 MB/s seed's turns alike got no piece for 12 s and then 64
at once, their own uploads idle meanwhile (docs/shardcast.md, thirty-fifth session). A
sender kept waiting `STARVED_S` goes first all the same, so no stream falls silent for long
whatever the queue ahead of it (a client gives up on a silent one after
`FetchPolicy.read_timeout`).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

WHOLE_TURNS_S = 2.0
"""A sender takes its whole send (up to `whole`) a turn while a whole send for every stream
sharing the cap takes at most this long at its rate, and `TURN_SLICE` bytes a turn past that,
so that a starved stream's turn (`STARVED_S`) is short."""
TURN_SLICE = 64 * 1024
STARVED_S = 20.0
"""A sender that has waited this long for its turn goes before the older streams: a third
of a client's `read_timeout` (60 s), and past a 1 MB/s seed's queue of 64 pieces of 256 KiB
(17 s), so that it fires only when a queue is longer than that."""


class Sending:
    """The payload streams a server is sending now. They share its upload cap, if it has
    one (`UploadThrottle.turn`), and its `/have` answer reports their number, so that a
    member asks a holder with a short queue rather than one with a long one (`fetcher`)."""

    def __init__(self) -> None:
        self.count = 0

    @contextmanager
    def stream(self) -> Iterator[None]:
        """Count one stream while it sends."""
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


@dataclass(order=True)
class _Waiter:
    since: float
    """When the sender's stream began: the earliest goes first (ties: the first to ask)."""
    order: int
    asked: float = field(compare=False)
    """When this turn was asked for: one asked `STARVED_S` ago goes before any other."""
    granted: trio.Event = field(default_factory=trio.Event, compare=False)
    gone: bool = field(default=False, compare=False)
    """Granted, or cancelled while waiting: left in the queues until it reaches a front."""


class UploadThrottle:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        # A small burst (50 ms of traffic) keeps the cap honest over short windows; sends
        # larger than it simply go into debt.
        self.capacity = burst if burst is not None else rate * 0.05
        self._tokens = self.capacity
        self._last: float | None = None  # set on first use: may be built outside trio.run
        self._held = False
        """A sender holds the cap (paying for its chunk), so others wait in the queues."""
        # The senders waiting, twice: by stream age (a heap) and in the order they asked (the
        # oldest ask is the first to starve). Each turn costs O(log waiting), so a thousand
        # streams held open make no turn slower to pick than a few.
        self._by_age: list[_Waiter] = []
        self._by_ask: deque[_Waiter] = deque()
        self._arrivals = itertools.count()

    def turn(self, whole: int, streams: int) -> int:
        """Bytes a stream should take a turn, `whole` being its usual send and `streams` the
        streams sharing the cap now (`Sending.count`)."""
        cycle_s = streams * whole / self.rate
        return whole if cycle_s <= WHOLE_TURNS_S else min(whole, TURN_SLICE)

    async def take(self, n: int, since: float | None = None) -> None:
        """Wait until `n` bytes may be sent. `since`: when the sender's stream began (its
        place in the queue); None puts it after every sender waiting now."""
        now = trio.current_time()
        if self._held:
            me = _Waiter(now if since is None else since, next(self._arrivals), now)
            heapq.heappush(self._by_age, me)
            self._by_ask.append(me)
            try:
                await me.granted.wait()
            except BaseException:
                if me.granted.is_set():
                    self._hand_on()  # granted as it was cancelled: the next one's turn
                else:
                    me.gone = True
                raise
        self._held = True
        try:
            now = trio.current_time()
            elapsed = 0.0 if self._last is None else now - self._last
            self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
            self._last = now
            self._tokens -= n
            if self._tokens < 0:
                await trio.sleep(-self._tokens / self.rate)
        finally:
            self._hand_on()

    @property
    def waiting(self) -> int:
        """Senders waiting for the cap now."""
        return sum(not w.gone for w in self._by_ask)

    def _hand_on(self) -> None:
        """Give the cap to the next sender: one starved for `STARVED_S` (the longest waiting
        first), else the one whose stream began first."""
        while self._by_ask and self._by_ask[0].gone:
            self._by_ask.popleft()
        if not self._by_ask:
            self._by_age.clear()  # only senders that are gone were left in it
            self._held = False
            return
        nxt = self._by_ask[0]
        if trio.current_time() - nxt.asked < STARVED_S:
            while self._by_age[0].gone:
                heapq.heappop(self._by_age)
            nxt = self._by_age[0]
        nxt.gone = True
        nxt.granted.set()
