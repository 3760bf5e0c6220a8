"""Bytes a SHARDCAST server sent, counted by an ASGI middleware on origins and relays alike.

Totals by weight version and by client address. `/stats` publishes the totals and the
per-version counts (not the client addresses) so a coordinator can show what each relay
served; the origin's full counts feed the coordinator's Weights page in-process.

Anyone can send requests, so the tables are bounded: only versions the server holds when the
request arrives are counted (a 404 for a made-up version adds nothing), at most
`MAX_VERSIONS` of them (the oldest is folded away), and at most `MAX_CLIENTS` addresses (the
rest are summed under "other").
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

_PAYLOAD = re.compile(r"^/v/([0-9]{1,18})/")
MAX_VERSIONS = 64
MAX_CLIENTS = 1024
OTHER = "other"


class ServedBytes:
    """Running totals of response body bytes, by weight version and by client address."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_version: Counter[int] = Counter()
        self.by_client: Counter[str] = Counter()
        self.requests = 0

    def add(self, version: int | None, client: str, n: int) -> None:
        with self._lock:
            if version is not None:
                self.by_version[version] += n
                if len(self.by_version) > MAX_VERSIONS:
                    del self.by_version[min(self.by_version)]
            if client not in self.by_client and len(self.by_client) >= MAX_CLIENTS:
                client = OTHER
            self.by_client[client] += n

    def count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def snapshot(self, clients: bool = True) -> dict[str, Any]:
        """Totals; `clients=False` leaves out who downloaded (for the public `/stats`)."""
        with self._lock:
            out: dict[str, Any] = {
                "total": sum(self.by_client.values()),
                "requests": self.requests,
                "by_version": {str(v): n for v, n in sorted(self.by_version.items())},
            }
            if clients:
                out["by_client"] = dict(self.by_client.most_common(50))
            return out


class CountServed:
    """ASGI middleware: counts every response body's bytes into `served`; a version's
    bytes only when `held(version)` says the server has it (every version without it)."""

    def __init__(
        self, app: Any, served: ServedBytes, held: Callable[[int], bool] | None = None
    ) -> None:
        self.app = app
        self.served = served
        self.held = held

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        m = _PAYLOAD.match(scope.get("path", ""))
        version = int(m.group(1)) if m else None
        if version is not None and self.held is not None and not self.held(version):
            version = None
        # By host only: a client opens many connections, each from another port.
        where = (scope.get("client") or ("?", 0))[0]
        self.served.count_request()

        async def counting_send(message: dict) -> None:
            if message.get("type") == "http.response.body":
                self.served.add(version, where, len(message.get("body", b"")))
            await send(message)

        await self.app(scope, receive, counting_send)
