"""Connections that never make a request: capped per address and in all, and closed when idle.

Real servers (`serve_app`, hypercorn over `shardcast.listener`) and real sockets. The
attacker connects from 127.0.0.2, the honest client from 127.0.0.1: two addresses on one
machine, with loopback counted (`limit_loopback`) as it is for remote addresses by default.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

import shardcast.server
from protocol.identity import Identity
from shardcast.limits import ServeLimits
from shardcast.listener import ConnectionGate, default_total
from shardcast.origin import Origin
from shardcast.server import serve_app

ATTACKER = "127.0.0.2"


def _app(limits: ServeLimits) -> FastAPI:
    app = FastAPI()
    app.state.limits = limits

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @app.get("/slow")
    async def slow() -> dict:
        await trio.sleep(2.5)
        return {"ok": True}

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"got": len(await request.body())}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(5):
                await trio.sleep(0.5)
                yield b"x" * 1024

        return StreamingResponse(chunks())

    return app


async def _connect(port: int, source: str = ATTACKER) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return sock


async def _which_closed(socks: list[trio.socket.SocketType], within_s: float) -> list[bool]:
    """`_closed_by_server` for each of `socks`, all watched at once."""
    closed = [False] * len(socks)

    async def watch(i: int) -> None:
        closed[i] = await _closed_by_server(socks[i], within_s)

    async with trio.open_nursery() as nursery:
        for i in range(len(socks)):
            nursery.start_soon(watch, i)
    return closed


async def _closed_by_server(sock: trio.socket.SocketType, within_s: float) -> bool:
    """Whether the server closes `sock` within `within_s` (EOF or reset)."""
    with trio.move_on_after(within_s):
        try:
            return await sock.recv(1) == b""
        except ConnectionResetError:
            return True
    return False


@pytest.mark.trio
async def test_one_address_holds_at_most_its_connections_and_others_still_get_in(
    monkeypatch,
) -> None:
    monkeypatch.setattr(shardcast.server, "KEEP_ALIVE_S", 2.0)
    limits = ServeLimits(connections_per_client=8, limit_loopback=True)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as http:
        url = await nursery.start(serve_app, _app(limits), "127.0.0.1", 0)
        port = int(url.rsplit(":", 1)[1])
        flood = [await _connect(port) for _ in range(20)]
        closed = await _which_closed(flood, 0.3)
        assert closed.count(True) == 12 and closed[:8] == [False] * 8
        assert (await http.get(f"{url}/health")).status_code == 200  # another address
        for s in flood:
            s.close()
        # A closed connection keeps its place until the server's keep-alive timer reaps it
        # (2 s here): connecting and closing in a loop gets no more than the cap.
        early = await _connect(port)
        assert await _closed_by_server(early, 0.3)
        early.close()
        await trio.sleep(2.5)
        again = await _connect(port)  # the places were given back
        assert not await _closed_by_server(again, 0.3)
        again.close()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_the_servers_total_bounds_connections_from_many_addresses() -> None:
    limits = ServeLimits(connections_per_client=8, total_connections=6, limit_loopback=True)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_app, _app(limits), "127.0.0.1", 0)
        port = int(url.rsplit(":", 1)[1])
        held = [await _connect(port, f"127.0.1.{i}") for i in range(6)]
        extra = await _connect(port, "127.0.2.1")
        assert await _closed_by_server(extra, 0.5)
        assert not any(await _which_closed(held, 0.2))
        for s in [*held, extra]:
            s.close()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_connection_that_completes_no_request_is_closed_but_a_long_request_is_not(
    monkeypatch,
) -> None:
    monkeypatch.setattr(shardcast.server, "KEEP_ALIVE_S", 1.0)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as http:
        url = await nursery.start(serve_app, _app(ServeLimits()), "127.0.0.1", 0)
        port = int(url.rsplit(":", 1)[1])
        silent = await _connect(port)
        trickle = await _connect(port)
        start = trio.current_time()
        closed_at = None
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":  # headers that never end
            try:
                await trickle.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_at = trio.current_time() - start
                break
            await trio.sleep(0.1)
        assert closed_at is not None or await _closed_by_server(trickle, 0.1)
        assert closed_at is None or closed_at < 3.0
        assert await _closed_by_server(silent, 0.5)
        # A request in progress is not idle: 2.5 s past a 1 s keep-alive still answers.
        assert (await http.get(f"{url}/slow")).status_code == 200
        for s in (silent, trickle):
            s.close()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_trickled_body_gets_408_at_its_deadline_and_a_long_response_is_not_cut() -> None:
    limits = ServeLimits(body_timeout=1.0)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as http:
        url = await nursery.start(serve_app, _app(limits), "127.0.0.1", 0)
        port = int(url.rsplit(":", 1)[1])
        sock = await _connect(port, "127.0.0.1")
        await sock.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        start, answer = trio.current_time(), b""
        with trio.move_on_after(5):
            for _ in range(100):  # a byte every 0.2 s: the body would take 20 s
                with trio.move_on_after(0.2):
                    answer += await sock.recv(4096)
                if answer:
                    break
                await sock.send(b"x")
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert trio.current_time() - start < 2.5
        sock.close()
        # A whole body is read, and a response that streams past the deadline is not cut.
        assert (await http.post(f"{url}/echo", content=b"y" * 5000)).json() == {"got": 5000}
        r = await http.get(f"{url}/stream")
        assert r.status_code == 200 and len(r.content) == 5 * 1024
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_stats_show_connections_open_and_refused(tmp_path) -> None:
    limits = ServeLimits(connections_per_client=4, limit_loopback=True)
    origin = Origin(tmp_path / "o", Identity.generate(), "pool", limits=limits)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as http:
        url = await nursery.start(origin.serve)
        port = int(url.rsplit(":", 1)[1])
        flood = [await _connect(port) for _ in range(10)]
        assert (await _which_closed(flood, 0.3)).count(True) == 6
        stats = (await http.get(f"{url}/stats")).json()
        assert stats["connections"] == {"open": 5, "refused": 6}  # 4, and this request's
        for s in flood:
            s.close()
        nursery.cancel_scope.cancel()


def test_loopback_is_not_counted_per_address_unless_asked_but_the_total_is() -> None:
    gate = ConnectionGate(per_client=1, total=3)
    assert gate.admit("127.0.0.1") and gate.admit("127.0.0.1")
    assert gate.admit("2001:db8::1") == "2001:db8::/64"
    assert gate.admit("2001:db8::2") is None  # the same /64
    assert gate.admit("203.0.113.9") is None  # the total
    gate.release("2001:db8::/64")
    assert gate.admit("203.0.113.9") == "203.0.113.9"
    assert gate.refused == 2 and gate.held == 3
    strict = ConnectionGate(per_client=1, total=3, limit_loopback=True)
    assert strict.admit("127.0.0.1") and strict.admit("127.0.0.1") is None


def test_a_servers_share_of_descriptors_follows_the_process_limit(monkeypatch) -> None:
    import resource

    for soft, want in [(1024, 256), (100, 64), (1 << 20, 4096)]:
        monkeypatch.setattr(resource, "getrlimit", lambda _r, soft=soft: (soft, soft))
        assert default_total() == want


@pytest.mark.trio
async def test_an_error_in_one_connection_ends_that_connection_not_the_server(
    monkeypatch,
) -> None:
    """hypercorn can raise out of a connection's handler (a client that closed mid-body while
    a response was going out made it raise `trio.BusyResourceError`), and such an error
    ended the whole server: a swarm member died of it. The first connection's handler
    raises that error here; the server must go on answering."""
    from shardcast import listener

    real = listener._Http11Server
    made: list[int] = []

    def first_fails(*args):
        made.append(1)
        if len(made) == 1:

            async def boom() -> None:
                raise trio.BusyResourceError("another task is currently sending data")

            return boom()
        return real(*args)

    monkeypatch.setattr(listener, "_Http11Server", first_fails)
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict:
        return {"ok": True}

    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_app, app, "127.0.0.1", 0)
        async with httpx.AsyncClient(timeout=5.0) as http:
            with pytest.raises(httpx.TransportError):
                await http.get(f"{url}/ping")  # the connection whose handler failed
            assert (await http.get(f"{url}/ping")).json() == {"ok": True}
        nursery.cancel_scope.cancel()
    assert len(made) == 2


async def _read_until_closed(sock: trio.socket.SocketType, within_s: float) -> bytes | None:
    """Everything the server sends on `sock` until it closes it; None if it is still open
    after `within_s`."""
    got = b""
    with trio.move_on_after(within_s):
        try:
            while data := await sock.recv(65536):
                got += data
        except ConnectionResetError:
            pass
        return got
    return None


# An HTTP/2 client's connection preface, then an empty SETTINGS frame (RFC 9113 3.4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
H2C_UPGRADE = (
    b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
)


@pytest.mark.trio
async def test_http2_is_refused_by_closing_the_connection() -> None:
    """hypercorn spoke HTTP/2 on a plain connection (the preface, or an h2c upgrade), and
    its HTTP/2 side read a response into memory past a closed flow-control window: 8 streams
    for a 32 MiB file held 265 MiB and their request slots for good. The server must close
    such a connection without an HTTP/2 frame; after an HTTP/1.1 request too."""
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_app, _app(ServeLimits()), "127.0.0.1", 0)
        port = int(url.rsplit(":", 1)[1])
        prior = await _connect(port)
        await prior.send(H2_PREFACE)
        assert await _read_until_closed(prior, 2.0) == b""  # no SETTINGS frame back
        later = await _connect(port)
        await later.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + H2_PREFACE)
        answer = await _read_until_closed(later, 2.0)
        assert answer is not None and answer.startswith(b"HTTP/1.1 200")
        assert answer.endswith(b'{"ok":true}')  # the HTTP/1.1 answer, then nothing
        upgrade = await _connect(port)
        await upgrade.send(H2C_UPGRADE)
        switched = await _read_until_closed(upgrade, 2.0)
        # hypercorn answers 101 before it would switch; nothing follows it
        assert switched is not None and switched.endswith(b"upgrade: h2c\r\n\r\n")
        for s in (prior, later, upgrade):
            s.close()
        nursery.cancel_scope.cancel()
