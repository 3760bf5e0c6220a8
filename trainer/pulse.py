"""A wake-up call for every task waiting on "the state changed"."""

from __future__ import annotations

import trio


class Pulse:
    """`fire()` wakes every task in `wait()` at that moment; later waiters wait for the next
    fire. `generation` counts fires, so a reader can tell whether what it cached is current."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self.generation = 0

    def fire(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()
