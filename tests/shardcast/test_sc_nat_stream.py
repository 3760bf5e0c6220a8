"""The SHARDCAST libp2p stream protocol and the relay hop's gate, in one process on loopback:
what a hostile peer on either end of a stream, or at the hop, can and cannot make us do."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from node.seeding import seed_behind_nat
from protocol.errors import TransportError
from protocol.host import Host
from protocol.identity import Identity
from shardcast.nat import HopLimits, P2PNode, Reachability, open_node, p2p_mounts
from shardcast.p2p import PROTOCOL_ID, StreamLimits, p2p_url
from shardcast.server import serve_app

BODY = bytes(range(256)) * 1024
BIG = BODY * 12  # 3 MiB


async def member_app(scope: dict, receive: Any, send: Any) -> None:
    """A member's HTTP server, reduced to what the tests need (tests/node uses it too)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/stall":
        await trio.sleep_forever()
    bodies = {"/v/1/f/x": BODY, "/big": BIG}
    status, body = (200, bodies[scope["path"]]) if scope["path"] in bodies else (404, b"no")
    headers = [(b"content-length", str(len(body)).encode()), (b"x-secret", b"internal")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _pair(nursery: trio.Nursery, limits: StreamLimits) -> tuple[P2PNode, P2PNode, object]:
    """A serving node (gateway in front of `member_app`) and a fetching node that knows its
    address."""
    base = await nursery.start(serve_app, member_app, "127.0.0.1", 0)
    server = await nursery.start(_node)
    client = await nursery.start(_node)
    await server.serve_member(base, [], limits)
    gateway = server.gateways[-1]
    client.learn(server.peer_id, server.addrs)
    return server, client, gateway


async def _node(task_status: trio.TaskStatus[P2PNode] = trio.TASK_STATUS_IGNORED) -> None:
    async with open_node(Identity.generate()) as node:
        task_status.started(node)
        await trio.sleep_forever()


async def _read_all(stream: Any) -> bytes:
    """Everything the other end sends until it closes or resets the stream."""
    got = b""
    with trio.fail_after(5):
        while True:
            try:
                data = await stream.read(65536)
            except Exception:  # StreamEOF or StreamReset: the end, either way
                return got
            if not data:
                return got
            got += data


def test_nat_stream_serves_what_http_serves_and_only_that() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server, client, gateway = await _pair(nursery, StreamLimits(read_timeout_s=1.0))
            async with httpx.AsyncClient(mounts=p2p_mounts(client)) as http:
                url = p2p_url(server.peer_id)
                r = await http.get(f"{url}/v/1/f/x")
                assert r.status_code == 200 and r.content == BODY
                assert "x-secret" not in r.headers  # only the listed headers cross
                assert (await http.get(f"{url}/v/2/f/x")).status_code == 404
                # A path that names another host is refused, not fetched.
                with pytest.raises(httpx.HTTPError):
                    await http.get(f"{url}//example.invalid/x")
                # A head over the cap is refused unread: the stream ends with no answer.
                stream = await client.open_stream(server.peer_id, PROTOCOL_ID)
                await stream.write((1 << 20).to_bytes(4, "big"))
                assert await _read_all(stream) == b""
            assert gateway.served == 2
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_nat_stream_answers_count_as_a_service_to_the_fetcher() -> None:
    """A member fetching from us is not the idle stranger that gives way when the host is
    full (`protocol.inbound`): an answer in full counts for its connection; a 404 does not."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server, client, _ = await _pair(nursery, StreamLimits(read_timeout_s=1.0))
            inbound = server.raw.get_network().inbound_connections
            async with httpx.AsyncClient(mounts=p2p_mounts(client)) as http:
                url = p2p_url(server.peer_id)
                assert (await http.get(f"{url}/v/2/f/x")).status_code == 404
                (held,) = [h for h in inbound.registered.values() if h.peer_id == client.peer_id]
                assert held.active == held.since
                await trio.sleep(0.05)
                assert (await http.get(f"{url}/v/1/f/x")).content == BODY
                assert held.active > held.since
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_nat_stream_stall_and_per_peer_cap() -> None:
    async def main() -> None:
        limits = StreamLimits(read_timeout_s=1.0, per_peer=1, deadline_s=3.0)
        async with trio.open_nursery() as nursery:
            server, client, gateway = await _pair(nursery, limits)
            timeout = httpx.Timeout(5.0, read=1.0)
            async with httpx.AsyncClient(mounts=p2p_mounts(client), timeout=timeout) as http:
                url = p2p_url(server.peer_id)
                # A member that stalls is a read timeout to the fetcher (scored as a stall).
                t0 = trio.current_time()
                with pytest.raises(httpx.ReadTimeout):
                    await http.get(f"{url}/stall")
                assert trio.current_time() - t0 < 3.0
                # Its stream stays counted until the gateway's own deadline ends it: while
                # it does, this peer's second request is turned away (per-peer cap of 1) with
                # a typed answer, as an HTTP source at its caps: busy, ask again in a second...
                busy = await http.get(f"{url}/v/1/f/x")
                assert (busy.status_code, busy.headers["retry-after"]) == (503, "1")
                assert busy.content == b"" and gateway.refused == 1
                # ...and once the deadline freed it, the peer is served again.
                with trio.fail_after(10):
                    while gateway.total:
                        await trio.sleep(0.1)
                assert (await http.get(f"{url}/v/1/f/x")).content == BODY
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_nat_hop_admits_only_chosen_peers() -> None:
    async def main() -> None:
        member, stranger = Identity.generate(), Identity.generate()
        async with (
            open_node(
                Identity.generate(),
                hop=HopLimits(),
                admit=lambda peer: peer == member.peer_id(),
            ) as hop,
            open_node(member) as m,
            open_node(stranger) as s,
        ):
            circuit = await m.reserve(hop.addrs[0])
            assert circuit.endswith(f"/p2p-circuit/p2p/{m.peer_id}")
            with pytest.raises(TransportError):
                await s.reserve(hop.addrs[0])
            # The stranger cannot use the hop to reach the member either.
            s.learn(m.peer_id, [circuit])
            with pytest.raises(TransportError):
                await s.open_stream(m.peer_id, PROTOCOL_ID)

    trio.run(main)


def test_nat_hop_forwards_no_faster_than_its_rate() -> None:
    """Every circuit through a hop, together, is held to `HopLimits.rate_bytes_s`: 3 MiB
    fetched through a 1.5 MB/s hop on two circuits at once cannot take less than the bytes
    it forwarded over the rate (minus one burst), and arrives whole."""
    rate = 1.5e6

    async def fetch(http: httpx.AsyncClient, url: str, got: list[bytes]) -> None:
        got.append((await http.get(url)).content)

    async def main() -> None:
        async with (
            open_node(Identity.generate(), hop=HopLimits(rate_bytes_s=rate)) as hop,
            open_node(Identity.generate(), dcutr=False) as member,
            open_node(Identity.generate(), dcutr=False) as fetcher,
            trio.open_nursery() as nursery,
        ):
            base = await nursery.start(serve_app, member_app, "127.0.0.1", 0)
            member.serve_gateway(base)
            circuit = await member.reserve(hop.addrs[0])
            fetcher.learn(member.peer_id, [circuit])  # the circuit is the only way there
            got: list[bytes] = []
            start = trio.current_time()
            async with (
                httpx.AsyncClient(mounts=p2p_mounts(fetcher), timeout=30) as http,
                trio.open_nursery() as fetches,
            ):
                fetches.start_soon(fetch, http, f"{p2p_url(member.peer_id)}/big", got)
                fetches.start_soon(fetch, http, f"{p2p_url(member.peer_id)}/v/1/f/x", got)
            elapsed = trio.current_time() - start
            assert sorted(map(len, got)) == [len(BODY), len(BIG)] and BIG in got
            assert hop.relayed_bytes > len(BIG) + len(BODY)  # framing and encryption add some
            assert elapsed >= (hop.relayed_bytes - 0.05 * rate) / rate, elapsed
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_nat_node_host_serves_shardcast_beside_the_pool_protocol() -> None:
    """`node.seeding.seed_behind_nat` on a node's own `Host`: one identity, one host, and
    SHARDCAST streams served next to the pool's protocol; detached cleanly."""

    async def main() -> None:
        identity = Identity.generate()
        async with (
            Host.open(identity, "testpool") as host,
            trio.open_nursery() as nursery,
        ):
            base = await nursery.start(serve_app, member_app, "127.0.0.1", 0)
            client = await nursery.start(_node)
            async with seed_behind_nat(host.libp2p) as node:
                assert node.peer_id == host.peer_id == identity.peer_id()
                reach, addrs = await node.serve_member(base, [])
                assert reach is Reachability.UNKNOWN  # no relay given: nothing was checked
                assert addrs == host.addrs
                client.learn(node.peer_id, addrs)
                async with httpx.AsyncClient(mounts=p2p_mounts(client)) as http:
                    r = await http.get(f"{p2p_url(node.peer_id)}/v/1/f/x")
                    assert r.content == BODY
            assert PROTOCOL_ID not in [str(p) for p in host.libp2p.get_mux().get_protocols()]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_nat_hop_gate_bounds_requests_per_peer_and_in_all() -> None:
    """The gate in front of the hop (and AutoNAT): per dialling peer and in all, whoever
    dials; a refused stream is reset, not served."""
    from types import SimpleNamespace

    from shardcast.nat import _Gate

    class Stream:
        def __init__(self, peer: str) -> None:
            peer_id = SimpleNamespace(to_base58=lambda: peer)
            self.muxed_conn = SimpleNamespace(peer_id=peer_id)
            self.was_reset = False

        async def reset(self) -> None:
            self.was_reset = True

    async def main() -> None:
        release = trio.Event()

        async def handler(stream: Any) -> None:
            await release.wait()

        gate = _Gate(per_peer=1, total=2, admit=None, deadline_s=5.0)
        streams = [Stream(p) for p in ("a", "a", "b", "c")]
        async with trio.open_nursery() as nursery:
            for s in streams:
                nursery.start_soon(gate.run, s, handler)
                await trio.sleep(0.01)
            # a's second is over its own cap; c's is over the total (a and b hold both).
            assert [s.was_reset for s in streams] == [False, True, False, True]
            assert gate.refused == 2
            release.set()
        assert not gate.active

    trio.run(main)
