"""Bytes the SHARDCAST origin served, counted in-process for the Weights page.

The origin's FastAPI app is already being served when the dashboard is mounted, so its
middleware cannot be added the usual way; instead the app's built ASGI stack is wrapped.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from typing import Any

_PAYLOAD = re.compile(r"^/v/(\d+)/")


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
            self.by_client[client] += n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": sum(self.by_client.values()),
                "requests": self.requests,
                "by_version": {str(v): n for v, n in sorted(self.by_version.items())},
                "by_client": dict(self.by_client.most_common(50)),
            }


class _Counting:
    def __init__(self, inner: Any, served: ServedBytes) -> None:
        self.inner = inner
        self.served = served

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.inner(scope, receive, send)
            return
        m = _PAYLOAD.match(scope.get("path", ""))
        version = int(m.group(1)) if m else None
        # By host only: a client opens many connections, each from another port.
        where = (scope.get("client") or ("?", 0))[0]
        with self.served._lock:
            self.served.requests += 1

        async def counting_send(message: dict) -> None:
            if message.get("type") == "http.response.body":
                self.served.add(version, where, len(message.get("body", b"")))
            await send(message)

        await self.inner(scope, receive, counting_send)


def count_served_bytes(app: Any) -> ServedBytes | None:
    """Wrap a Starlette app's ASGI stack so every response body is counted; None if `app` is
    not a Starlette app."""
    if not hasattr(app, "build_middleware_stack"):
        return None
    served = ServedBytes()
    stack = app.middleware_stack or app.build_middleware_stack()
    app.middleware_stack = _Counting(stack, served)
    return served
