"""SHARDCAST over libp2p streams, for members HTTP cannot reach (behind NAT).

A member's libp2p host answers `PROTOCOL_ID` by passing each request to its own SHARDCAST
HTTP server on loopback and streaming the answer back: one request per stream, so a stream
serves exactly what the member's HTTP server serves, from the same store, under the same
rules (ranges, cut-through waits, throttle, caps). Fetchers reach such a member through a
source URL `p2p://peer/<peer id>` (the id sits in the path: URL hosts are case-folded and
peer ids are not), which `P2PTransport` turns into a stream; everything else in the fetch
path, hash checks and source scoring included, is the one used for HTTP sources.

Wire format, one stream per request:
  request:  frame(JSON {"method", "path", "headers", "body_bytes"}) + body
  response: frame(JSON {"status", "headers"}) + body bytes up to the end of the stream
A frame is a 4-byte big-endian length and that many bytes (`protocol.framing`).

The peer on the other end may be hostile, on either side: the request and response heads are
capped, only a few headers cross, every read and write is bounded by a timeout, a stream has
an overall deadline, and the body has a size cap.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from protocol.errors import ProtocolError
from protocol.framing import HEADER_BYTES, encode_frame, parse_header

log = logging.getLogger(__name__)

PROTOCOL_ID = "/swarmrl/shardcast/1.0.0"
SCHEME = "p2p"
URL_PREFIX = f"{SCHEME}://peer/"
READ_CHUNK = 256 * 1024
MAX_PEER_ID_CHARS = 64
"""An ed25519 peer id in base58 is 52 characters; anything much longer is not one."""

REQUEST_HEADERS = frozenset({"range"})
"""Request headers passed to the member's server: the only one a fetcher sends."""
RESPONSE_HEADERS = frozenset(
    {"content-range", "content-length", "content-type", "retry-after", "accept-ranges"}
)
METHODS = frozenset({"GET", "POST"})
"""POST only for /peers (a member's announcement); the server refuses it elsewhere."""


@dataclass(frozen=True)
class StreamLimits:
    head_bytes: int = 8 * 1024
    """Largest request or response head (method, path, headers)."""
    request_body_bytes: int = 64 * 1024
    """Largest request body (a signed peer announcement is far smaller)."""
    response_bytes: int = 1 << 31
    """Largest response body relayed (a shard; the server's own cap is the real bound)."""
    read_timeout_s: float = 10.0
    """Longest silence while reading a request head or body."""
    write_timeout_s: float = 30.0
    """Longest a single write may wait: a reader that stopped reading is cut."""
    deadline_s: float = 300.0
    """Longest a stream lives, whatever it does (longer than any long-poll or shard wait)."""
    per_peer: int = 16
    """Requests in progress at once from one peer."""
    total: int = 48
    """Requests in progress at once from everyone. Below the member's HTTP cap per address
    (`ServeLimits.per_client`, 64): every stream reaches it from loopback, one address, so
    more would only be turned away there, after the stream's work had begun."""


def p2p_url(peer_id: str) -> str:
    """The source URL of a member reached by libp2p stream."""
    return URL_PREFIX + peer_id


def peer_of_source(url: str) -> str:
    """The peer id of a bare source URL `p2p://peer/<id>` (nothing before or after, an
    ed25519 peer id); ProtocolError for anything else. What a node may advertise."""
    from protocol.host import public_key_of_peer

    peer = url[len(URL_PREFIX) :] if url.startswith(URL_PREFIX) else ""
    if not peer or len(peer) > MAX_PEER_ID_CHARS or not peer.isalnum():
        raise ProtocolError(f"not a bare p2p source URL: {url[:80]!r}")
    public_key_of_peer(peer)  # raises ProtocolError for a malformed or non-ed25519 id
    return peer


def split_url(url: httpx.URL) -> tuple[str, str]:
    """(peer id, path with query) of a `p2p://peer/<id>/...` URL."""
    raw = url.raw_path.decode("ascii")
    if url.scheme != SCHEME or url.host != "peer" or not raw.startswith("/"):
        raise ProtocolError(f"not a p2p source URL: {url}")
    peer, _, rest = raw[1:].partition("/")
    if not peer:
        raise ProtocolError(f"no peer id in {url}")
    return peer, "/" + rest


class _Reader:
    """Buffered reads off a libp2p stream: exact lengths for heads, chunks for bodies."""

    def __init__(self, stream: Any, timeout_s: float) -> None:
        self._stream = stream
        self._buffer = b""
        self.timeout_s = timeout_s

    async def chunk(self, n: int = READ_CHUNK) -> bytes:
        """Up to `n` bytes; b"" at the end of the stream. Raises trio.TooSlowError."""
        from libp2p.network.stream.exceptions import StreamEOF

        if self._buffer:
            out, self._buffer = self._buffer[:n], self._buffer[n:]
            return out
        with trio.fail_after(self.timeout_s):
            try:
                data = await self._stream.read(n)
            except StreamEOF:
                return b""
        return data or b""

    async def exactly(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = await self.chunk(READ_CHUNK)
            if not data:
                raise ProtocolError(f"stream ended after {got} of {n} bytes")
            take = data[: n - got]
            self._buffer = data[n - got :] + self._buffer
            parts.append(take)
            got += len(take)
        return b"".join(parts)

    async def frame(self, cap: int) -> bytes:
        return await self.exactly(parse_header(await self.exactly(HEADER_BYTES), cap))


def _head(fields: dict) -> bytes:
    return encode_frame(json.dumps(fields, separators=(",", ":")).encode())


def _parse_head(data: bytes) -> dict:
    try:
        head = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: brackets nested too deep
        raise ProtocolError(f"bad head: {e}") from None
    if not isinstance(head, dict):
        raise ProtocolError("bad head: not an object")
    return head


def _headers(raw: object, allowed: frozenset[str]) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ProtocolError("bad head: headers not an object")
    return {
        str(k).lower(): str(v)
        for k, v in raw.items()
        if str(k).lower() in allowed and isinstance(v, str)
    }


# ----------------------------------------------------------------------------- serving


BUSY_RETRY_AFTER_S = 1
"""What a gateway at its caps asks a fetcher to wait (the fetcher's busy budget bounds it)."""
BUSY_WRITE_S = 1.0
"""The longest a busy answer may take to write: a peer that reads nothing costs no more."""


class StreamGateway:
    """Answers `PROTOCOL_ID` streams from the member's HTTP server at `base_url`."""

    def __init__(
        self,
        base_url: str,
        limits: StreamLimits | None = None,
        timeout_s: float = 60.0,
        on_served: Callable[[Any], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.limits = limits or StreamLimits()
        self.on_served = on_served
        """Called with a stream's muxed connection once its request is answered in full, and
        not with an error status."""
        # Loopback to our own server: its answers are trusted, their size is still capped.
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=5.0), follow_redirects=False
        )
        self.active: Counter[str] = Counter()
        self.total = 0
        self.served = 0
        self.refused = 0

    async def aclose(self) -> None:
        await self.http.aclose()

    async def handle(self, stream: Any) -> None:
        """One request on `stream`, answered and closed; never raises (a bad peer only
        loses its own stream)."""
        peer = stream.muxed_conn.peer_id.to_base58()
        if self.total >= self.limits.total or self.active[peer] >= self.limits.per_peer:
            self.refused += 1
            await self._busy(stream)
            return
        self.active[peer] += 1
        self.total += 1
        try:
            with trio.move_on_after(self.limits.deadline_s):
                await self._answer(stream)
        except (ProtocolError, trio.TooSlowError, httpx.HTTPError) as e:
            log.info("p2p request from %s dropped: %s: %s", peer, type(e).__name__, e)
        except Exception as e:  # a libp2p stream error: the peer went away mid-answer
            log.info("p2p stream from %s broke: %s: %s", peer, type(e).__name__, e)
        finally:
            self.total -= 1
            self.active[peer] -= 1
            if not self.active[peer]:
                del self.active[peer]
            await close_stream(stream)

    async def _busy(self, stream: Any) -> None:
        """Turn a stream away with a 503 and a Retry-After, its request unread, as the HTTP
        server does at its caps. A reset said nothing: py-libp2p's reset can overtake the
        protocol's confirmation, so the fetcher saw "does not serve" (a failed attempt, the
        source scored down) where an HTTP source would have said "busy, wait a second". The
        answer is one small write into the stream's window, bounded by `BUSY_WRITE_S`."""
        with trio.move_on_after(BUSY_WRITE_S), contextlib.suppress(Exception):
            head = {"status": 503, "headers": {"retry-after": str(BUSY_RETRY_AFTER_S)}}
            await stream.write(_head(head))
        await close_stream(stream)

    async def _answer(self, stream: Any) -> None:
        lim = self.limits
        reader = _Reader(stream, lim.read_timeout_s)
        head = _parse_head(await reader.frame(lim.head_bytes))
        method, path, size = head.get("method"), head.get("path"), head.get("body_bytes", 0)
        if method not in METHODS or not isinstance(path, str) or not path.startswith("/"):
            raise ProtocolError(f"bad request {method!r} {path!r}")
        if path.startswith("//") or "\\" in path:
            raise ProtocolError(f"bad path {path!r}")  # never let a path name another host
        if not isinstance(size, int) or not 0 <= size <= lim.request_body_bytes:
            raise ProtocolError(f"bad body size {size!r}")
        body = await reader.exactly(size) if size else b""
        headers = _headers(head.get("headers", {}), REQUEST_HEADERS)
        url = self.base_url + path
        async with self.http.stream(method, url, headers=headers, content=body) as r:
            out = {k: v for k, v in r.headers.items() if k.lower() in RESPONSE_HEADERS}
            await _write(stream, _head({"status": r.status_code, "headers": out}), lim)
            sent = 0
            async for data in r.aiter_raw(READ_CHUNK):
                sent += len(data)
                if sent > lim.response_bytes:
                    raise ProtocolError(f"response over {lim.response_bytes} bytes")
                await _write(stream, data, lim)
        self.served += 1
        # What the pool's routes count too: an answer, not a refusal (an unknown path, a cap)
        if self.on_served is not None and r.status_code < 400:
            self.on_served(stream.muxed_conn)


async def _write(stream: Any, data: bytes, lim: StreamLimits) -> None:
    with trio.fail_after(lim.write_timeout_s):
        await stream.write(data)


async def close_stream(stream: Any) -> None:
    """Close `stream`, quietly: one the peer reset already has nothing left to close."""
    with trio.move_on_after(2.0), contextlib.suppress(Exception):
        await stream.close()


async def reset_stream(stream: Any) -> None:
    """Reset `stream` (the peer sees an abort, not an end), quietly."""
    with trio.move_on_after(2.0), contextlib.suppress(Exception):
        await stream.reset()


# ----------------------------------------------------------------------------- fetching

OpenStream = Callable[[str, str], Awaitable[Any]]
"""open_stream(peer id, protocol id) -> a libp2p stream (`shardcast.nat.P2PNode`)."""


class P2PTransport(httpx.AsyncBaseTransport):
    """httpx transport for `p2p://peer/<id>/...` URLs: each request is one stream.

    Mount it on the fetch path's client (`mounts={"p2p://": P2PTransport(...)}`): failures
    surface as httpx errors, so a p2p source is retried, timed and scored as any other.
    """

    def __init__(self, open_stream: OpenStream, limits: StreamLimits | None = None) -> None:
        self.open_stream = open_stream
        self.limits = limits or StreamLimits()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        lim = self.limits
        timeouts = request.extensions.get("timeout", {})
        read_timeout = timeouts.get("read") or lim.read_timeout_s
        connect_timeout = timeouts.get("connect") or lim.read_timeout_s
        try:
            peer, path = split_url(request.url)
        except ProtocolError as e:
            raise httpx.UnsupportedProtocol(str(e), request=request) from None
        body = await request.aread()
        if len(body) > lim.request_body_bytes:
            raise httpx.LocalProtocolError("request body too large for a stream", request=request)
        headers = {k: v for k, v in request.headers.items() if k.lower() in REQUEST_HEADERS}
        try:
            with trio.fail_after(connect_timeout):
                stream = await self.open_stream(peer, PROTOCOL_ID)
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"no stream to {peer}", request=request) from None
        except Exception as e:  # TransportError, or whatever libp2p raised while dialling
            raise httpx.ConnectError(f"{peer}: {type(e).__name__}: {e}", request=request) from e
        try:
            head = {"method": request.method, "path": path, "headers": headers}
            head["body_bytes"] = len(body)
            await _write(stream, _head(head) + body, lim)
            reader = _Reader(stream, read_timeout)
            answer = _parse_head(await reader.frame(lim.head_bytes))
            status = answer.get("status")
            if not isinstance(status, int) or not 100 <= status < 600:
                raise ProtocolError(f"bad status {status!r}")
            out = _headers(answer.get("headers", {}), RESPONSE_HEADERS)
        except BaseException as e:
            await reset_stream(stream)
            if isinstance(e, trio.TooSlowError):
                raise httpx.ReadTimeout(f"{peer}: no answer", request=request) from None
            if isinstance(e, ProtocolError):
                raise httpx.RemoteProtocolError(f"{peer}: {e}", request=request) from None
            if isinstance(e, Exception):
                raise httpx.ReadError(f"{peer}: {type(e).__name__}: {e}", request=request) from e
            raise
        return httpx.Response(
            status, headers=out, stream=_Body(stream, reader, lim, request), request=request
        )


class _Body(httpx.AsyncByteStream):
    """A response body read off its stream, chunk by chunk, each read under the timeout."""

    def __init__(
        self, stream: Any, reader: _Reader, lim: StreamLimits, request: httpx.Request
    ) -> None:
        self._stream = stream
        self._reader = reader
        self._lim = lim
        self._request = request
        self._ended = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        got = 0
        while True:
            try:
                data = await self._reader.chunk()
            except trio.TooSlowError:
                raise httpx.ReadTimeout("p2p body stalled", request=self._request) from None
            except Exception as e:  # the stream was reset, or the connection died
                msg = f"p2p body broke: {type(e).__name__}: {e}"
                raise httpx.ReadError(msg, request=self._request) from e
            if not data:
                self._ended = True
                return
            got += len(data)
            if got > self._lim.response_bytes:
                raise httpx.RemoteProtocolError("p2p body too large", request=self._request)
            yield data

    async def aclose(self) -> None:
        # A body left unread (cancelled, or more than we wanted) is reset, not drained.
        if self._ended:
            await close_stream(self._stream)
        else:
            await reset_stream(self._stream)
