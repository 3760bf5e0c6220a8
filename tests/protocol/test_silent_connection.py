"""A connection that goes silent while it looks open is closed, and the next request dials
afresh (`protocol.host.negotiate_stream`).

Two real hosts talk through a TCP proxy on 127.0.0.1 that stands for the network. Freezing it
stops every byte on the connections it carries while all four sockets stay open: what a client
sees of a peer that restarted behind a NAT, or of a connection whose other side a crossed dial
closed. Connections made after the freeze pass.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import peer_process as peer
import pytest
import trio

from protocol.errors import SilentConnection, TransportError
from protocol.host import Host, HostConfig
from protocol.identity import Identity

pytestmark = pytest.mark.trio

POOL = "testpoolaaaaaaaaaaaaaaaa"
QUICK = HostConfig(
    dial_timeout_s=1.0,
    dial_attempts=1,
    request_timeout_s=5.0,
    read_timeout_s=2.0,
    write_timeout_s=2.0,
    gossip=False,
    reuse_streams=False,  # every request negotiates a stream
)


class FreezableProxy:
    """Forwards each TCP connection to `target_port`; `freeze()` silences the ones open now."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._open: list[trio.Event] = []

    def freeze(self) -> None:
        for frozen in self._open:
            frozen.set()

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._carry, listeners)

    async def _carry(self, client: trio.SocketStream) -> None:
        frozen = trio.Event()
        self._open.append(frozen)
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, frozen)
            nursery.start_soon(self._pump, server, client, frozen)

    @staticmethod
    async def _pump(src: trio.SocketStream, dst: trio.SocketStream, frozen: trio.Event) -> None:
        while data := await src.receive_some(65536):
            if frozen.is_set():
                await trio.sleep_forever()  # hold the sockets open, pass nothing
            await dst.send_all(data)


async def proxy_to(server: Host, nursery: trio.Nursery) -> tuple[FreezableProxy, str]:
    """A proxy in front of `server`, started in `nursery`, and the address that reaches
    `server` through it."""
    port = server.addrs[0].split("/tcp/")[1].split("/")[0]
    proxy = FreezableProxy(int(port))
    await nursery.start(proxy.serve)
    return proxy, server.addrs[0].replace(f"/tcp/{port}/", f"/tcp/{proxy.port}/")


async def test_a_silent_connection_is_closed_and_the_next_request_dials_afresh():
    async with (
        Host.open(Identity.generate(), POOL, config=QUICK) as server,
        Host.open(Identity.generate(), POOL, config=QUICK) as client,
        trio.open_nursery() as nursery,
    ):
        server.serve(peer.ECHO_PROTOCOL, peer.echo, peer.Echo, peer.EchoReply)
        proxy, address = await proxy_to(server, nursery)

        async def echo(n: int) -> int:
            reply = await client.request(
                address, peer.ECHO_PROTOCOL, peer.Echo(n=n, data=b"x"), peer.EchoReply
            )
            return reply.message.n - 1  # the echo answers n + 1

        assert await echo(1) == 1
        proxy.freeze()
        started = trio.current_time()
        with pytest.raises(SilentConnection):
            await echo(2)
        # Told within the negotiation bound, not the request's timeout.
        assert trio.current_time() - started < QUICK.request_timeout_s
        assert server.peer_id not in client.connected_peers()
        assert client.stats.silent_connections_closed == 1
        # The next request dials a new connection instead of waiting on the dead one again
        # (the frozen ones carry nothing; py-libp2p may take the server's direct address,
        # learnt from identify, instead of the proxy's).
        assert await echo(3) == 3
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("reuse_within_s", [30.0, 0.5])
async def test_a_request_after_a_pause_checks_the_connection_rather_than_reuse_a_stream(
    reuse_within_s: float,
):
    """An idle stream is reused only soon after its last answer (`reuse_within_s`). A request
    on an idle stream of a connection that went silent meanwhile waits its whole request
    timeout (the control, reusing for 30 s); after a pause, a new stream's negotiation tells
    the silence within `dial_timeout_s` and closes the connection."""
    config = replace(QUICK, reuse_streams=True, reuse_within_s=reuse_within_s)
    async with (
        Host.open(Identity.generate(), POOL, config=config) as server,
        Host.open(Identity.generate(), POOL, config=config) as client,
        trio.open_nursery() as nursery,
    ):
        server.serve(peer.ECHO_PROTOCOL, peer.echo, peer.Echo, peer.EchoReply)
        proxy, address = await proxy_to(server, nursery)
        request = (address, peer.ECHO_PROTOCOL, peer.Echo(n=1, data=b"x"))
        await client.request(*request, peer.EchoReply)  # its stream is kept for the next
        await trio.sleep(0.6)
        proxy.freeze()
        started = trio.current_time()
        with pytest.raises(TransportError) as failed:
            await client.request(*request, peer.EchoReply)
        took = trio.current_time() - started
        if reuse_within_s > 1.0:
            assert not isinstance(failed.value, SilentConnection)
            assert took >= config.request_timeout_s - 0.1  # waited on the reused stream
        else:
            assert isinstance(failed.value, SilentConnection)
            assert took < config.dial_timeout_s + 1.0
            assert client.stats.silent_connections_closed == 1
        nursery.cancel_scope.cancel()


async def test_a_peer_that_refuses_a_protocol_keeps_its_connection():
    """Refusal is not silence: a peer that does not serve a protocol answers the negotiation,
    and the connection stays for what it does serve."""
    async with (
        Host.open(Identity.generate(), POOL, config=QUICK) as server,
        Host.open(Identity.generate(), POOL, config=QUICK) as client,
    ):
        server.serve(peer.ECHO_PROTOCOL, peer.echo, peer.Echo, peer.EchoReply)
        with pytest.raises(TransportError) as refused:
            await client.request(
                server.addrs[0],
                "/swarmrl-test/unserved/1",
                peer.Echo(n=1, data=b""),
                peer.EchoReply,
            )
        assert not isinstance(refused.value, SilentConnection)
        assert server.peer_id in client.connected_peers()
        assert client.stats.silent_connections_closed == 0
