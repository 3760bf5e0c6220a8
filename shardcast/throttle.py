"""Upload throttle shared by every connection of one server: caps its total upload rate.

Used by benchmarks to model "this relay has U bytes/s of upload" on one machine, and by
operators who must not saturate a link. Senders take tokens before each chunk and go into
debt; each then sleeps until its share of the debt is paid, so concurrent senders together
never exceed the rate and none is starved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio

WHOLE_TURNS_S = 2.0
"""A sender takes its whole send (up to `whole`) a turn while a whole send for every stream
sharing the cap takes at most this long at its rate, and `TURN_SLICE` bytes a turn past that.
The cap pays turns in order, so k streams each wait k turns between two of theirs: with whole
1 MiB sends, 64 streams at 10 MB/s got 1 MiB every 6.7 s each, and their clients' rate floor
(`FetchPolicy.min_rate` over 5 s) cut them as stalled, over and over. Slicing every turn cost
the 8-member quick bench 8%: whole turns finish pieces one after another, and a finished piece
can be passed on sooner (docs/shardcast.md, thirtieth session)."""
TURN_SLICE = 64 * 1024


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
        self.streams = 0
        """Streams sending under this cap now (each inside `sending()`)."""

    @contextmanager
    def sending(self) -> Iterator[None]:
        """Count one stream among those sharing the cap while it sends."""
        self.streams += 1
        try:
            yield
        finally:
            self.streams -= 1

    def turn(self, whole: int) -> int:
        """Bytes a stream should take a turn, `whole` being its usual send."""
        cycle_s = self.streams * whole / self.rate
        return whole if cycle_s <= WHOLE_TURNS_S else min(whole, TURN_SLICE)

    async def take(self, n: int) -> None:
        now = trio.current_time()
        elapsed = 0.0 if self._last is None else now - self._last
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)
