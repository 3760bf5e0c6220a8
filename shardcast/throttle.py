"""Upload throttle shared by every connection of one server: caps its total upload rate.

Used by benchmarks to model "this relay has U bytes/s of upload" on one machine, and by
operators who must not saturate a link. Senders take tokens before each chunk and go into
debt; each then sleeps until its share of the debt is paid, so concurrent senders together
never exceed the rate and none is starved.
"""

from __future__ import annotations

import trio


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
        """Responses sending under this cap now (kept by the server)."""

    async def take(self, n: int) -> None:
        now = trio.current_time()
        elapsed = 0.0 if self._last is None else now - self._last
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)
