"""The HTTP face of a store, shared by origin and relay (FastAPI, served by hypercorn on trio).

    GET /versions?after=N&wait=S   JSON listing; long-polls up to S seconds for a version > N
    GET /v/{N}/manifest            the signed manifest bytes
    GET /v/{N}/f/{name}            a payload file, streamed; single-range `Range` supported
    GET /v/{N}/have?after=K&wait=S  which pieces are held, and which are being fetched from a
                                   seed (hex bitfields), and how many payload streams are
                                   being sent; long-polls up to S s for more than K held
                                   pieces (or, with &changes=C, for more than C changes;
                                   with &want=BITS too, for a change to a piece in BITS)
    GET|POST /peers                signed peer announcements (servers given a PeerTable)
    GET /peerlist                  the coordinator's signed peer list, if one is held
    GET /stats                     bytes served since start: total, requests, by version;
                                   connections open and refused
    GET /health                    liveness

Files are streamed in chunks read off the event loop, so no shard is ever held in memory
and a slow client only slows its own stream. On a relay a requested byte range may cover
pieces (shards, without pieces) not yet held: the response waits for each one to be
verified (cut-through) and
gives up with 503 (before the body) or a cut stream (inside it) after `shard_wait` seconds.

Clients may be hostile (see limits.py): requests in progress are capped per address and in
total, a client that stops reading is cut after `send_timeout`, headers and path numbers of
any length or alphabet get a 4xx (never a 500), and `/stats` counts only held versions and
names no client address unless the operator opts in.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import trio
from fastapi import FastAPI, HTTPException, Request, Response
from hypercorn.config import Config

from shardcast.errors import ManifestError
from shardcast.limits import BodyDeadline, CapConnections, ServeLimits
from shardcast.listener import ConnectionGate, serve
from shardcast.manifest import PayloadFile, unit_range
from shardcast.peerlist import PeerListHolder
from shardcast.peers import MAX_ANNOUNCEMENT_BYTES, PeerTable
from shardcast.store import StoredVersion, VersionStore
from shardcast.throttle import Sending, UploadThrottle
from shardcast.traffic import CountServed, ServedBytes

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
KEEP_ALIVE_S = 20.0
"""Seconds a connection may sit without a request in progress before it is closed."""
MAX_LONG_POLL = 60.0
MIN_CLIENT_RATE = 16 * 1024
"""Bytes a second below which a client taking one chunk of a payload is cut
(`_BoundedStream._send_within`): a 1 MiB chunk gets `send_timeout` + 64 s."""
# ASCII digits only (`\d` would take any script's digits), and at most 18 of them: a longer
# number is past the end of any file, and int() of thousands of digits raises.
_RANGE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$", re.ASCII)
_VERSION = re.compile(r"^[0-9]{1,18}$", re.ASCII)
MAX_DIGITS = 18


def _number(digits: str) -> int:
    """A Range number; too many digits means "larger than any file"."""
    return int(digits) if len(digits) <= MAX_DIGITS else 10**MAX_DIGITS


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single `bytes=` range, None for no header.

    Raises HTTPException(416) for a range that cannot be satisfied or is not understood.
    """
    if header is None:
        return None
    m = _RANGE.match(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        raise HTTPException(416, "only one range of the form bytes=a-b is supported")
    if m.group(1):
        start = _number(m.group(1))
        end = _number(m.group(2)) + 1 if m.group(2) else size
    else:  # suffix range: the last n bytes
        start, end = max(0, size - _number(m.group(2))), size
    end = min(end, size)
    if start >= end:
        raise HTTPException(416, f"range {header[:64]!r} is outside the {size}-byte file")
    return start, end


def parse_version(text: str) -> int:
    """A version from a URL path; 400 for anything but a short decimal number."""
    if not _VERSION.match(text):
        raise HTTPException(400, "a version is a decimal number of at most 18 digits")
    return int(text)


def create_app(
    store: VersionStore,
    bucket: UploadThrottle | None = None,
    shard_wait: float = 30.0,
    limits: ServeLimits | None = None,
    peers: PeerTable | None = None,
    peer_list: PeerListHolder | None = None,
) -> FastAPI:
    limits = limits or ServeLimits()
    app = FastAPI(title="shardcast", docs_url=None, redoc_url=None, openapi_url=None)
    served = ServedBytes()
    app.add_middleware(CountServed, served=served, held=lambda v: store.get(v) is not None)
    # Outermost, so a refused request costs nothing else.
    app.add_middleware(CapConnections, limits=limits)
    app.state.served = served
    app.state.limits = limits
    app.state.gate = gate = ConnectionGate.for_limits(limits)
    app.state.sending = sending = Sending()

    def version_or_404(version: str) -> StoredVersion:
        sv = store.get(parse_version(version))
        if sv is None:
            raise HTTPException(404, f"version {version} is not held here")
        return sv

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True, "latest": store.latest()}

    @app.get("/stats")
    async def stats() -> dict:
        """Bytes served since this server started (totals and by version), and connections
        open now and refused since (over `ServeLimits`' connection caps)."""
        out = served.snapshot(clients=limits.stats_clients)
        out["connections"] = {"open": gate.held, "refused": gate.refused}
        return out

    @app.get("/versions")
    async def versions(after: int = -1, wait: float = 0.0) -> dict:
        if wait > 0:  # NaN compares false: no wait
            await store.wait_newer(after, min(wait, MAX_LONG_POLL))
        return store.listing()

    @app.get("/v/{version}/have")
    async def have(
        version: str,
        after: int = -1,
        wait: float = 0.0,
        changes: int | None = None,
        want: str | None = None,
    ) -> dict:
        """`bits`: units held; `soon`: units being fetched from a seed; `streams`: payload
        streams being sent now. Long-polls for more than `after` held units, or (given
        `changes`) for any change to either; given `want` too (a bitfield of the units the
        asker lacks), for a change to one of those."""
        sv = version_or_404(version)
        try:
            wanted = None if want is None else sv.wanted_units(want)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        if wait > 0 and changes is not None:
            await sv.wait_changes(changes, min(wait, MAX_LONG_POLL), wanted)
        elif wait > 0:
            await sv.wait_held(after, min(wait, MAX_LONG_POLL))
        return {
            "held": sv.held,
            "changes": sv.changes,
            "bits": sv.bitfield(),
            "soon": sv.soon_bitfield(),
            "streams": sending.count,
        }

    if peer_list is not None:

        @app.get("/peerlist")
        async def get_peer_list() -> Response:
            """The newest coordinator-signed peer list held here (receivers verify it)."""
            if peer_list.raw is None:
                raise HTTPException(404, "no peer list held")
            return Response(peer_list.raw, media_type="application/octet-stream")

    if peers is not None:

        @app.get("/peers")
        async def get_peers() -> Response:
            body = b'{"peers":[' + b",".join(peers.encoded()) + b"]}"
            return Response(body, media_type="application/json")

        @app.post("/peers", status_code=204)
        async def post_peer(request: Request) -> Response:
            data = bytearray()
            async for chunk in request.stream():
                data += chunk
                if len(data) > MAX_ANNOUNCEMENT_BYTES:
                    raise HTTPException(413, "announcement too large")
            if peers.add(bytes(data)) is None:
                raise HTTPException(400, "announcement refused")
            return Response(status_code=204)

    @app.get("/v/{version}/manifest")
    async def manifest(version: str) -> Response:
        sv = version_or_404(version)
        return Response(sv.manifest_bytes, media_type="application/octet-stream")

    @app.get("/v/{version}/f/{name:path}")
    async def payload(version: str, name: str, request: Request) -> Response:
        sv = version_or_404(version)
        try:
            p = sv.manifest.payload_file(name)
        except ManifestError:
            raise HTTPException(404, f"version {version} has no payload {name!r}") from None
        rng = parse_range(request.headers.get("range"), p.size)
        start, end = rng if rng is not None else (0, p.size)
        first = start // sv.manifest.unit
        # Before sending headers, make sure the first unit is there: a relay that is behind
        # answers 503 quickly enough for the client to go elsewhere.
        if not await sv.wait_for(name, first, shard_wait):
            if sv.dropped:
                raise HTTPException(404, f"version {version} was dropped")
            raise HTTPException(503, f"piece {first} of {name!r} is not held yet")
        headers = {"content-length": str(end - start), "accept-ranges": "bytes"}
        status = 200
        if rng is not None:
            status = 206
            headers["content-range"] = f"bytes {start}-{end - 1}/{p.size}"
        body = _FileBody(sv, p, start, end, bucket, shard_wait, sending)
        return _BoundedStream(body, status, headers, limits.send_timeout)

    return app


class _FileBody:
    """Bytes [start, end) of one payload file, read in chunks off the event loop, waiting
    for each shard to be held (cut-through)."""

    def __init__(
        self,
        sv: StoredVersion,
        p: PayloadFile,
        start: int,
        end: int,
        bucket: UploadThrottle | None,
        shard_wait: float,
        sending: Sending,
    ) -> None:
        self.sv, self.p, self.start, self.end = sv, p, start, end
        self.bucket = bucket
        self.shard_wait = shard_wait
        self.sending = sending

    async def chunks(self, fd: int) -> AsyncIterator[bytes]:
        sv, p = self.sv, self.p
        pos = self.start
        since = trio.current_time()  # this stream's place in the cap's queue: oldest first
        while pos < self.end:
            index = pos // sv.manifest.unit
            s_start, s_len = unit_range(sv.manifest, p, index)
            if not await sv.wait_for(p.name, index, self.shard_wait):
                # Cutting the stream short is the only honest signal left once the headers
                # are out; the client sees a short body and resumes elsewhere.
                log.info("v%d %s: piece %d never came; cut", sv.version, p.name, index)
                return
            stop = min(self.end, s_start + s_len, pos + READ_CHUNK)
            data = await trio.to_thread.run_sync(os.pread, fd, stop - pos, pos)
            if not data:
                return
            if self.bucket is None:
                yield data
            else:
                turn = self.bucket.turn(READ_CHUNK, self.sending.count)
                for i in range(0, len(data), turn):
                    piece = data[i : i + turn]
                    await self.bucket.take(len(piece), since)
                    yield piece
            pos += len(data)


class _BoundedStream(Response):
    """Streams a `_FileBody`, its file open (and it counted among the streams being sent)
    only while the response runs; a send that misses its deadline (`_send_within`) ends it."""

    media_type = "application/octet-stream"

    def __init__(self, body: _FileBody, status: int, headers: dict, send_timeout: float) -> None:
        super().__init__(status_code=status, headers=headers)
        self.file_body = body
        self.send_timeout = send_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = self.file_body.sv.payload_path(self.file_body.p.name)
        fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
        try:
            with self.file_body.sending.stream():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                    try:
                        await self._send_body(send, fd)
                    except trio.TooSlowError:
                        log.info("a send to a client missed its deadline; response cut")
                    nursery.cancel_scope.cancel()
        finally:
            os.close(fd)

    async def _send_body(self, send: Any, fd: int) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await self._send_within(send, {**start, "headers": self.raw_headers}, 0)
        async for data in self.file_body.chunks(fd):
            body = {"type": "http.response.body", "body": data, "more_body": True}
            await self._send_within(send, body, len(data))
        await self._send_within(send, {"type": "http.response.body", "body": b""}, 0)

    async def _send_within(self, send: Any, message: dict, size: int) -> None:
        """One send, given up (TooSlowError) after `send_timeout` seconds plus its `size` at
        `MIN_CLIENT_RATE`: the kernel's deadline (`_Config`) ends a write that stays
        unacknowledged, not a send the server's protocol never completes (HTTP/2's, with
        the client's flow-control window closed, held a response forever before `listener`
        refused HTTP/2). The rate term spares an honest client on a slow link, whose send
        of a whole chunk is slow but never stalls."""
        with trio.fail_after(self.send_timeout + size / MIN_CLIENT_RATE):
            await send(message)


async def _cancel_on_disconnect(receive: Any, scope: trio.CancelScope) -> None:
    """Stop a response once its client has gone. Sends to a closed connection are dropped
    without an error, so a client that asked for a large range and hung up had the rest read
    from disk and paid to the upload cap, slowing every other stream under it."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


class _Config(Config):
    """Hypercorn's config, with a kernel send deadline on every connection.

    Hypercorn shields its socket writes from cancellation, so the app cannot time out a
    send to a client that stopped reading. TCP_USER_TIMEOUT (Linux; inherited by accepted
    sockets) makes the kernel drop a connection whose data stays unacknowledged, zero-window
    probes included, for that long: the blocked write then fails and the connection closes.
    """

    send_timeout: float = 30.0

    def _create_sockets(self, binds: list[str], type_: int = socket.SOCK_STREAM) -> list:
        sockets = super()._create_sockets(binds, type_)
        if hasattr(socket, "TCP_USER_TIMEOUT") and type_ == socket.SOCK_STREAM:
            for sock in sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    ms = int(self.send_timeout * 1000)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, ms)
        return sockets


def hypercorn_config(host: str, port: int, send_timeout: float = 30.0) -> Config:
    config = _Config()
    config.send_timeout = send_timeout
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # Between requests only (a long-poll or a cut-through wait is a request in progress): it
    # also bounds a connection that never completes a request, which holds a slot of
    # `listener.ConnectionGate` until then.
    config.keep_alive_timeout = KEEP_ALIVE_S
    return config


async def serve_app(
    app: FastAPI,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until cancelled; `task_status.started` gets the base URL (real port)."""
    async with trio.open_nursery() as nursery:
        # An app wrapped in plain ASGI middleware has no state: the defaults then.
        state = getattr(app, "state", None)
        limits = getattr(state, "limits", None) or ServeLimits()
        config = hypercorn_config(host, port, limits.send_timeout)
        gate = getattr(state, "gate", None) or ConnectionGate.for_limits(limits)
        served = BodyDeadline(app, limits.body_timeout)
        binds = await nursery.start(partial(serve, served, config, gate))
        task_status.started(binds[0])
