"""Requests the coordinator's HTTP API works on at once: a few in all, fewer per client.

The API's handlers are plain functions that FastAPI runs in worker threads, and those threads
are the ones the trainer, the in-process validator and the weights server wait on too (trio
has one pool per process). So how many API requests run at once is how much of that pool the
public can take: unbounded, one address with 40 connections asking for a costly page held
every thread and a training step waited 15 s for one. A request also holds its reply in
memory until the client has read it, so a client that never reads held up to 4 MiB a
connection.

`RequestSlots` runs at most `total` requests at once (handler and reply), and at most
`per_client` of them for one address (an IPv6 /64 as one): a client's further requests
wait for its own slots first, so one address cannot queue ahead of everyone. A request that
found no slot within `wait_s` is answered 503 with `Retry-After`.
"""

from __future__ import annotations

import trio
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from protocol.ratelimit import client_key


class RequestSlots:
    """ASGI middleware: bounded requests in progress, in total and per client address."""

    def __init__(
        self, app: ASGIApp, total: int = 8, per_client: int = 4, wait_s: float = 10.0
    ) -> None:
        if not 0 < per_client <= total:
            raise ValueError(f"need 0 < per_client <= total, got {per_client} and {total}")
        self.app = app
        self.total = total
        self.per_client = per_client
        self.wait_s = wait_s
        self._all = trio.Semaphore(total)
        self._clients: dict[str, trio.Semaphore] = {}
        self._waiting: dict[str, int] = {}
        """Requests of each client in progress or waiting; its entry goes at zero."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = client_key(scope["client"][0]) if scope.get("client") else ""
        mine = self._clients.get(client)
        if mine is None:
            mine = self._clients[client] = trio.Semaphore(self.per_client)
        self._waiting[client] = self._waiting.get(client, 0) + 1
        try:
            if not await self._acquire(mine):
                busy = JSONResponse(
                    {"detail": "the API is busy; retry later"}, 503, {"retry-after": "5"}
                )
                await busy(scope, receive, send)
                return
            try:
                await self.app(scope, receive, send)
            finally:
                self._all.release()
                mine.release()
        finally:
            self._waiting[client] -= 1
            if not self._waiting[client]:
                del self._waiting[client], self._clients[client]

    async def _acquire(self, mine: trio.Semaphore) -> bool:
        """The client's slot, then one of all: True once both are held, False (holding
        neither) when `wait_s` passed first. Only the wait is bounded, never the request."""
        with trio.move_on_after(self.wait_s):
            await mine.acquire()
            try:
                await self._all.acquire()
            except BaseException:
                mine.release()
                raise
            return True
        return False

    def in_progress(self) -> int:
        """Requests running now (holding a slot)."""
        return self.total - self._all.value
