"""Inbound connections hold a slot from accept to close (`protocol.inbound`).

Real libp2p hosts on 127.0.0.1; each behaviour is first shown on py-libp2p's own inbound
handler (the control), then on ours.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import SimpleNamespace
from typing import Any

import libp2p
import multiaddr
import peer_process as peer
import pytest
import trio
from attackers import hold_silent_sockets
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import info_from_p2p_addr

from protocol.errors import TransportError
from protocol.host import Host, HostConfig
from protocol.identity import Identity
from protocol.inbound import InboundConnections, InboundLimits, _Held
from protocol.libp2p_stack import new_host

LOCAL = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
POOL = "testpoolaaaaaaaaaaaaaaaa"


def small(max_connections: int) -> ConnectionConfig:
    """py-libp2p's settings with a small inbound cap (max_connections - min_connections)."""
    return ConnectionConfig(
        max_connections=max_connections,
        min_connections=0,
        low_watermark=0,
        high_watermark=max_connections,
        max_connections_per_peer=1,
        auto_connect_interval=3600.0,
    )


@asynccontextmanager
async def running(raw: Any) -> AsyncIterator[tuple[Any, Any]]:
    async with raw.run(LOCAL):
        yield raw, info_from_p2p_addr(multiaddr.Multiaddr(f"{raw.get_addrs()[0]}"))


@asynccontextmanager
async def clients(n: int) -> AsyncIterator[list[Any]]:
    keys = [create_new_key_pair() for _ in range(n)]
    hosts = [libp2p.new_host(key_pair=k, connection_config=small(300)) for k in keys]
    async with trio.open_nursery() as nursery:
        for h in hosts:
            await nursery.start(_run_client, h)
        yield hosts
        for h in hosts:  # closes their connections; cancelling alone leaves the sockets open
            await h.close()
        nursery.cancel_scope.cancel()


async def _run_client(raw: Any, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with raw.run([]):
        task_status.started()
        await trio.sleep_forever()


async def admitted(client: Any, server: Any, info: Any) -> bool:
    """Whether `client` gets a connection that `server` keeps (a refused one fails the
    handshake, or is closed right after it)."""
    client.get_network().unblock_peer(info.peer_id)  # py-libp2p backs off a failed dial 60 s
    try:
        with trio.fail_after(5):
            await client.connect(info)
            await trio.sleep(0.2)
    except Exception:
        return False
    return client.get_id() in server.get_network().connections


async def until(check: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.05)


async def churn(server: Any, info: Any, times: int) -> list[bool]:
    """One client connects and disconnects `times` times, never holding two connections."""
    outcomes = []
    async with clients(1) as (client,):
        for _ in range(times):
            outcomes.append(await admitted(client, server, info))
            await client.disconnect(info.peer_id)
            await until(lambda: client.get_id() not in server.get_network().connections)
    return outcomes


@pytest.mark.trio
async def test_connections_that_came_and_went_do_not_lock_out_the_next():
    # Control: py-libp2p's handler gives an inbound slot back only when the swarm stops, so
    # after 4 connections (its cap here) no fifth gets in, though none is open.
    control = libp2p.new_host(key_pair=create_new_key_pair(), connection_config=small(4))
    async with running(control) as (server, info):
        assert await churn(server, info, 6) == [True] * 4 + [False] * 2

    ours = new_host(create_new_key_pair(), connection_config=small(4))
    async with running(ours) as (server, info):
        assert await churn(server, info, 10) == [True] * 10
        inbound = server.get_network().inbound_connections
        await until(lambda: inbound.open == 0)
        assert inbound.refused == 0


@pytest.mark.trio
async def test_one_address_holds_at_most_its_share_until_one_closes():
    # Control: py-libp2p counts connections from one address nowhere.
    control = libp2p.new_host(key_pair=create_new_key_pair())
    async with running(control) as (server, info), clients(3) as hosts:
        assert [await admitted(c, server, info) for c in hosts] == [True, True, True]

    limits = InboundLimits(per_address=2, exempt_loopback=False)
    async with running(new_host(create_new_key_pair(), limits)) as (server, info):
        inbound = server.get_network().inbound_connections
        async with clients(3) as (a, b, c):
            assert [await admitted(x, server, info) for x in (a, b, c)] == [True, True, False]
            assert inbound.refused >= 1 and inbound.held == {"127.0.0.1": 2}
            await a.disconnect(info.peer_id)
            await until(lambda: inbound.open == 1)
            assert await admitted(c, server, info)
        await until(lambda: inbound.open == 0)
        assert inbound.held == {}  # nothing kept per address once its connections are gone


@pytest.mark.trio
async def test_a_host_counts_held_connections_per_address_as_configured():
    limits = {"limit_loopback": True, "connections_held_per_ip": 1, "gossip": False}
    config = HostConfig(connections_per_ip_s=1000.0, connection_burst=1000.0, **limits)
    one_dial = HostConfig(dial_attempts=1, gossip=False)
    async with (
        Host.open(Identity.generate(), POOL, config=config) as server,
        Host.open(Identity.generate(), POOL, config=one_dial) as first,
        Host.open(Identity.generate(), POOL, config=one_dial) as second,
    ):
        await first.connect(server.addrs[0])
        with pytest.raises(TransportError):
            await second.connect(server.addrs[0])
        assert server.stats.connections_over_held >= 1  # exported as a metric
        assert server.stats.connections_refused == 0  # the rate was not what refused it
    # Loopback is not counted by default: the simulated swarm runs on one machine.
    async with (
        Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as server,
        Host.open(Identity.generate(), POOL, config=one_dial) as first,
        Host.open(Identity.generate(), POOL, config=one_dial) as second,
    ):
        await first.connect(server.addrs[0])
        await second.connect(server.addrs[0])
        assert server.libp2p.get_network().inbound_connections.held == {"": 2}


@pytest.mark.trio
async def test_silent_sockets_do_not_keep_a_peer_out():
    # Control: py-libp2p's host counts a handshake in progress against its connections, so
    # sockets that never speak fill it until its upgrade timeout, again and again.
    control = libp2p.new_host(key_pair=create_new_key_pair(), connection_config=small(8))
    async with running(control) as (server, info), trio.open_nursery() as hogs:
        await hogs.start(hold_silent_sockets, int(info.addrs[0].value_for_protocol("tcp")), 40)
        await trio.sleep(0.5)
        async with clients(1) as (client,):
            assert not await admitted(client, server, info)
        hogs.cancel_scope.cancel()

    limits = InboundLimits(handshakes=4)
    ours = new_host(create_new_key_pair(), limits, connection_config=small(8))
    async with running(ours) as (server, info), trio.open_nursery() as hogs:
        await hogs.start(hold_silent_sockets, int(info.addrs[0].value_for_protocol("tcp")), 40)
        await trio.sleep(0.5)
        inbound = server.get_network().inbound_connections
        async with clients(3) as peers:
            assert [await admitted(c, server, info) for c in peers] == [True] * 3
        assert inbound.handshakes_cut > 0 and len(inbound.handshaking) <= 4
        hogs.cancel_scope.cancel()


async def echo(client: Host, server: Host) -> None:
    await client.request(server.addrs[0], peer.ECHO_PROTOCOL, peer.Echo(n=1), peer.EchoReply)


@pytest.mark.trio
async def test_idle_strangers_give_way_and_preferred_peers_never_do():
    # Control: py-libp2p's host, full of connections that do nothing, keeps everyone out.
    control = libp2p.new_host(key_pair=create_new_key_pair(), connection_config=small(3))
    async with running(control) as (server, info), clients(4) as (a, b, c, newcomer):
        assert [await admitted(x, server, info) for x in (a, b, c)] == [True] * 3
        await trio.sleep(InboundLimits().grace_s)
        assert not await admitted(newcomer, server, info)

    config = HostConfig(max_connections=3, gossip=False)
    one_dial = HostConfig(dial_attempts=1, gossip=False)
    grace = InboundLimits().grace_s
    async with AsyncExitStack() as stack:

        async def peer_host() -> Host:
            return await stack.enter_async_context(
                Host.open(Identity.generate(), POOL, config=one_dial)
            )

        server = await stack.enter_async_context(
            Host.open(Identity.generate(), POOL, config=config)
        )
        server.serve(peer.ECHO_PROTOCOL, peer.echo, peer.Echo, peer.EchoReply)
        member, member2, s1, s2, s3, s4 = [await peer_host() for _ in range(6)]
        server.prefer(lambda peer_id: peer_id in (member.peer_id, member2.peer_id))
        inbound = server.libp2p.get_network().inbound_connections

        def held() -> set[str]:
            return set(server.connected_peers())

        for client in (member, s1, s2):
            await echo(client, server)
        # Full, and both strangers are inside their grace: a third stranger may close neither.
        with pytest.raises(TransportError):
            await echo(s3, server)
        await until(lambda: held() == {member.peer_id, s1.peer_id, s2.peer_id})
        assert inbound.evicted == 0
        assert server.stats.connections_over_held >= 1

        await trio.sleep(grace)
        await echo(s1, server)  # s1 is busy, s2 idle since its first request
        await echo(s4, server)
        await until(lambda: s2.peer_id not in held())
        assert held() == {member.peer_id, s1.peer_id, s4.peer_id} and inbound.evicted == 1

        # A preferred peer need not wait out a stranger's grace; it closes the idlest stranger.
        await echo(member2, server)
        await until(lambda: s1.peer_id not in held())
        assert held() == {member.peer_id, member2.peer_id, s4.peer_id}

        # Strangers, however many and however busy, never close a preferred peer's connection.
        await trio.sleep(grace)
        await echo(s1, server)
        await until(lambda: s4.peer_id not in held())
        assert member.peer_id in held() and member2.peer_id in held()
        assert inbound.evicted == 3


@pytest.mark.trio
async def test_the_victim_is_the_idlest_stranger_a_newcomer_may_close():
    """Hand-built: who gives way, for a stranger and for a preferred newcomer."""
    swarm = SimpleNamespace(
        connection_config=SimpleNamespace(max_connections=4, high_watermark=4),
        _handle_inbound_connection=None,
    )
    slots = InboundConnections(swarm, InboundLimits(handshakes=2, grace_s=10.0))
    assert slots.total == 4 and swarm.connection_config.max_connections == 6

    def conn(peer_id: str) -> Any:
        return SimpleNamespace(is_closed=False, muxed_conn=SimpleNamespace(peer_id=peer_id))

    now = trio.current_time()
    old_busy = _Held(conn("old-busy"), since=now - 60, active=now - 1)
    old_idle = _Held(conn("old-idle"), since=now - 60, active=now - 30)
    member = _Held(conn("member"), since=now - 60, active=now - 50)
    young = _Held(conn("young"), since=now - 1, active=now - 1)
    newcomer = _Held(conn("new"), since=now, active=now)
    for held in (old_busy, old_idle, member, young, newcomer):
        slots.registered[held.peer_id] = held  # keyed by muxed connection in the host
    slots.preferred = lambda peer_id: peer_id == "member"
    assert slots._victim(newcomer, member=False) is old_idle
    old_idle.conn.is_closed = True  # gone already: not a victim twice
    assert slots._victim(newcomer, member=False) is old_busy
    old_busy.active = now  # now young is the idlest, but a stranger cannot close it
    young.active = now - 5
    assert slots._victim(newcomer, member=False) is old_busy
    assert slots._victim(newcomer, member=True) is young  # a preferred newcomer can
    slots.preferred = lambda peer_id: True
    assert slots._victim(newcomer, member=True) is None  # nobody to close: it is refused
