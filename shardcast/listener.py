"""TCP connections counted per client address and in all, before HTTP sees them.

A connection that never sends a request costs a server a socket, a file descriptor and a
task, and never reaches the per-request caps (`limits.CapConnections`). Without a cap here one
address could open connections until the process ran out of file descriptors; measured at the
common limit of 1,024 descriptors, 1,100 idle connections from one address made an honest GET
time out, and the process could open no file: in the coordinator that is SQLite, checkpoints
and the libp2p host failing too. So every accepted connection counts against its client
address (an IPv6 /64 as one, `protocol.ratelimit.client_key`) and against the server's total;
one past either is closed at once, before hypercorn reads a byte (our cost: an accept and a
close). A connection that completes no request is closed by hypercorn after its
`keep_alive_timeout`, so holding a slot costs its holder a new connection that often; one
the client closed keeps its place until then too (its descriptor is closed at once).

hypercorn builds its own listeners, so `serve` runs its connection handler (`TCPServer`) over
ours; the handler is an internal of hypercorn's, hence the version bound in pyproject.toml.

HTTP/1.1 only. hypercorn switches a plain connection to HTTP/2 on the prior-knowledge preface
(`PRI * HTTP/2.0`) or an `Upgrade: h2c` request, and its HTTP/2 side takes a response's body
from the app whether or not the client's flow-control window is open: a client that opened
8 streams for a 32 MiB file and never sent WINDOW_UPDATE had the server read 265 MiB into
memory, and held its request slots for good (the kernel's send deadline never fired, as
nothing was unacknowledged). No SHARDCAST client or API caller speaks HTTP/2, so such a
connection is closed instead (`_Http11Server`). This covers every server built on `serve`:
SHARDCAST's origin, relays and swarm members, and the coordinator's HTTP API
(`shardcast.server.serve_app`).
"""

from __future__ import annotations

import logging
import resource
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from protocol.ratelimit import client_key, is_loopback
from shardcast.limits import ServeLimits

log = logging.getLogger(__name__)

MAX_TOTAL = 4096
"""Connections one server holds at most, however many descriptors the process may open."""


def default_total() -> int:
    """A server's share of this process's descriptors: a quarter of the soft limit (a process
    runs a few servers, and needs descriptors for files, SQLite and libp2p), 64 to
    `MAX_TOTAL`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_TOTAL
    return max(64, min(MAX_TOTAL, soft // 4))


class ConnectionGate:
    """Open connections by client address and in all, with their caps."""

    def __init__(self, per_client: int, total: int, limit_loopback: bool = False) -> None:
        if per_client < 1 or total < 1:
            raise ValueError(f"connection caps must be at least 1, not {per_client}/{total}")
        self.per_client = per_client
        self.total = total
        self.limit_loopback = limit_loopback
        self.open: Counter[str] = Counter()
        self.held = 0
        self.refused = 0

    @classmethod
    def for_limits(cls, limits: ServeLimits) -> ConnectionGate:
        """The gate `limits` describe (`total_connections` 0: `default_total()`)."""
        return cls(
            limits.connections_per_client,
            limits.total_connections or default_total(),
            limits.limit_loopback,
        )

    def admit(self, host: str) -> str | None:
        """Count a new connection from `host`: the key to release it with, or None when it
        is one too many (counted in `refused`)."""
        key = client_key(host)
        capped = self.limit_loopback or not is_loopback(host)
        if self.held >= self.total or (capped and self.open[key] >= self.per_client):
            self.refused += 1
            return None
        self.open[key] += 1
        self.held += 1
        return key

    def release(self, key: str) -> None:
        self.held -= 1
        self.open[key] -= 1
        if not self.open[key]:
            del self.open[key]  # the table holds only addresses with connections open


class _CountedStream(trio.abc.HalfCloseableStream):
    """An accepted connection that gives its place back when it closes (trio's streams are
    final classes, so this wraps one)."""

    def __init__(self, inner: trio.SocketStream, release: Callable[[], None]) -> None:
        self.inner = inner
        self.socket = inner.socket  # hypercorn reads the addresses from it
        self._release: Callable[[], None] | None = release

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if not data:
            # The client closed. hypercorn stops reading here but keeps the connection
            # until its keep-alive timer fires: the descriptor goes back now, the place in
            # the gate at `aclose`, so connecting and closing in a loop is bounded too.
            self.socket.close()
        return data

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
        await self.inner.aclose()


class GatedListener(trio.abc.Listener[trio.abc.HalfCloseableStream]):
    """A listener that closes a connection past the gate's caps as soon as it is accepted."""

    def __init__(self, inner: trio.SocketListener, gate: ConnectionGate) -> None:
        self.inner = inner
        self.gate = gate

    async def accept(self) -> trio.abc.HalfCloseableStream:
        while True:
            stream = await self.inner.accept()
            try:
                host = stream.socket.getpeername()[0]
            except OSError:  # already gone
                stream.socket.close()
                continue
            key = self.gate.admit(host)
            if key is None:
                stream.socket.close()
                continue
            return _CountedStream(stream, partial(self.gate.release, key))

    async def aclose(self) -> None:
        await self.inner.aclose()


async def serve(
    app: object,
    config: Config,
    gate: ConnectionGate,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` (ASGI) on `config.bind` over gated listeners until cancelled; started with
    the bound URLs. Plain HTTP only: SHARDCAST and the API run behind a TLS proxy if any."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan = Lifespan(wrapped, config, {})
    context = WorkerContext(None)
    async with trio.open_nursery() as nursery:
        await nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        sockets = config.create_sockets()
        listeners, binds = [], []
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
            listeners.append(
                GatedListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)), gate)
            )
            binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
        handler = partial(
            _one_connection,
            partial(_Http11Server, wrapped, config, context, ConnectionState({})),
        )
        task_status.started(binds)
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


async def _one_connection(
    run: Callable[[trio.abc.Stream], Awaitable[None]], stream: trio.abc.Stream
) -> None:
    """Serve one connection; an error in it ends that connection, never the server.
    `trio.serve_listeners` lets an error out of any connection's handler end every
    connection and the server with it, and hypercorn can raise there: a peer that closed
    its connection in the middle of a request body while a response was going out made
    hypercorn send its error response on the same socket at the same time, and trio raised
    `BusyResourceError`. That took a swarm member down (thirty-first session), and the
    coordinator's HTTP API runs on the same server."""
    try:
        await run(stream)
    except Exception as e:  # an ExceptionGroup too; a cancellation is not caught
        log.warning("a connection ended with an error: %s: %s", type(e).__name__, e)
        await trio.aclose_forcefully(stream)  # its place in the gate goes back


class _Http11Only:
    """A connection's protocol that never becomes HTTP/2: a request that would switch it (the
    HTTP/2 preface, or `Upgrade: h2c`, which hypercorn answers 101 before switching) closes
    the connection instead."""

    def __init__(self, inner: ProtocolWrapper) -> None:
        self.inner = inner

    async def initiate(self) -> None:
        await self.inner.initiate()

    async def handle(self, event: Event) -> None:
        # `inner.protocol` is hypercorn's HTTP/1.1 protocol (a plain connection starts there);
        # calling it past `inner.handle` skips the switch that `inner.handle` makes.
        try:
            await self.inner.protocol.handle(event)
        except (H2ProtocolAssumedError, H2CProtocolRequiredError):
            log.info("closed a connection that asked for HTTP/2 (served: HTTP/1.1 only)")
            await self.inner.send(Closed())


class _Http11Server(TCPServer):
    """hypercorn's connection handler, HTTP/1.1 only (see the module's docstring). It builds
    the connection's protocol inside `run` and offers no setting to refuse HTTP/2, so the
    protocol is wrapped in `_Http11Only` as `run` sets it."""

    @property
    def protocol(self) -> _Http11Only:
        return self._http11

    @protocol.setter
    def protocol(self, wrapper: ProtocolWrapper) -> None:
        self._http11 = _Http11Only(wrapper)
