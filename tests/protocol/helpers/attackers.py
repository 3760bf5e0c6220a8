"""Attackers shared by the tests and `bench/slot_hog.py`."""

from __future__ import annotations

from collections import Counter

import trio


async def hold_silent_sockets(
    port: int,
    n: int,
    source: str | None = None,
    counts: Counter[str] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`n` TCP connections to 127.0.0.1:`port` (from `source`, an address of this machine)
    that never send a byte, each opened again once the host closes it: the cheapest way to
    hold a host's slots (a socket, no handshake, no identity). Runs until cancelled; counts
    the sockets opened in `counts["sockets opened"]`."""
    counts = Counter() if counts is None else counts

    async def hold() -> None:
        while True:
            try:
                sock = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
            except OSError:
                await trio.sleep(0.05)
                continue
            counts["sockets opened"] += 1
            async with sock:
                try:
                    while await sock.receive_some(4096):
                        pass
                except trio.BrokenResourceError:
                    pass

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(hold)
        task_status.started()
