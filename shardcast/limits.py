"""Limits a SHARDCAST server puts on its clients, who may be hostile.

Every connection holds a task, a socket and often an open file, so how many a peer may hold
at once is capped: per client address and in total, for connections (`listener`: one past a
cap is closed as it is accepted) and for requests in progress (`CapConnections`: one past a
cap is answered at once with 503 and `Retry-After`, cheap for us; the client goes to another
source). An IPv6 /64 counts as one address. A request body must arrive within `body_timeout`
(`BodyDeadline`). A client
that stops reading is cut after `send_timeout` seconds without acknowledging our data.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio
from fastapi import HTTPException

from protocol.ratelimit import client_key


@dataclass(frozen=True)
class ServeLimits:
    per_client: int = 64
    """Requests in progress at once from one address (a client fetches `parallel` shards
    and long-polls; a relay a few more). Clients behind one NAT or proxy share it."""
    total: int = 1024
    """Requests in progress at once from everyone."""
    connections_per_client: int = 128
    """TCP connections open at once from one address (an IPv6 /64 as one), requests or not
    (`shardcast.listener`): room for `per_client` requests and a client's idle keep-alive
    connections. Loopback is not counted unless `limit_loopback`."""
    total_connections: int = 0
    """TCP connections open at once from everyone; 0 takes a quarter of the process's
    open-files limit, 64 to 4,096 (`listener.default_total`)."""
    limit_loopback: bool = False
    """Count loopback connections against `connections_per_client` too. Off by default: a
    client on this machine is the operator's own process (the simulated swarm runs every
    node on 127.0.0.1)."""
    body_timeout: float = 30.0
    """Seconds a request's body may take to arrive, from the first read of it
    (`BodyDeadline`); past them the request gets 408."""
    send_timeout: float = 30.0
    """Longest a client may leave sent data unacknowledged (it stopped reading) before the
    kernel drops the connection (TCP_USER_TIMEOUT, Linux)."""
    retry_after: int = 1
    """Seconds suggested to a client turned away."""
    stats_clients: bool = False
    """Publish bytes per client address in `/stats` (operator's opt-in: addresses are
    personal data, and tell an attacker who the relays' clients are)."""


class CapConnections:
    """ASGI middleware: at most `per_client` requests in progress per address, `total` in
    all; the rest get 503 with Retry-After before any work is done for them."""

    def __init__(self, app: Any, limits: ServeLimits) -> None:
        self.app = app
        self.limits = limits
        self.active: Counter[str] = Counter()
        self.total = 0

    def busy(self, where: str) -> bool:
        return self.total >= self.limits.total or self.active[where] >= self.limits.per_client

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        where = client_key((scope.get("client") or ("?", 0))[0])
        if self.busy(where):
            await self._refuse(send)
            return
        self.active[where] += 1
        self.total += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.total -= 1
            self.active[where] -= 1
            if not self.active[where]:
                del self.active[where]  # the table holds only addresses with requests open

    async def _refuse(self, send: Any) -> None:
        body = b"too many requests in progress; retry later or elsewhere"
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(self.limits.retry_after).encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class BodyDeadline:
    """ASGI middleware: a request's body must arrive within `seconds` of the first read of it.

    hypercorn closes a connection that sits `keep_alive_timeout` without a request, but not
    one whose request is in progress: a body trickled a byte at a time held its connection,
    and a request slot, for as long as the sender liked. A body still incomplete at the
    deadline gets 408 (raised from `receive`, so FastAPI answers it from the route that was
    reading). Reads after the body is complete (a streaming response listening for the
    client's disconnect) are not timed.
    """

    def __init__(self, app: Any, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        deadline: float | None = None
        complete = False

        async def timed_receive() -> dict:
            nonlocal deadline, complete
            if complete:
                return await receive()
            if deadline is None:
                deadline = trio.current_time() + self.seconds
            with trio.move_on_at(deadline):
                message = await receive()
                complete = message.get("type") != "http.request" or not message.get("more_body")
                return message
            raise HTTPException(408, f"request body not received within {self.seconds:g} s")

        await self.app(scope, timed_receive, send)
