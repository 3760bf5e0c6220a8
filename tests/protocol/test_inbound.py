"""Inbound connections hold a slot from accept to close (`protocol.inbound`).

Real libp2p hosts on 127.0.0.1; each behaviour is first shown on py-libp2p's own inbound
handler (the control), then on ours.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import libp2p
import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import info_from_p2p_addr

from protocol.errors import TransportError
from protocol.host import Host, HostConfig
from protocol.identity import Identity
from protocol.inbound import InboundConnections, InboundLimits
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
async def test_a_full_host_makes_room_for_an_address_holding_less(monkeypatch):
    # The address a connection counts against is set by the test (every peer here is on
    # 127.0.0.1); py-libp2p's own retries of a refused dial count against the same one.
    address = {"now": "a"}
    monkeypatch.setattr(InboundConnections, "_key", lambda self, stream: address["now"])

    async def arrive(client: Any, server: Any, info: Any, at: str) -> bool:
        address["now"] = at
        return await admitted(client, server, info)

    # Control: py-libp2p's host, full from one address, keeps every other address out.
    control = libp2p.new_host(key_pair=create_new_key_pair(), connection_config=small(3))
    async with running(control) as (server, info), clients(4) as (a1, a2, a3, b1):
        assert [await arrive(c, server, info, "a") for c in (a1, a2, a3)] == [True] * 3
        assert not await arrive(b1, server, info, "b")

    limits = InboundLimits(per_address=8)
    ours = new_host(create_new_key_pair(), limits, connection_config=small(3))
    async with running(ours) as (server, info), clients(7) as (a1, a2, a3, b1, a4, c1, d1):
        inbound = server.get_network().inbound_connections
        assert [await arrive(c, server, info, "a") for c in (a1, a2, a3)] == [True] * 3
        # Full: b holds none, a holds three, so a's newest connection makes room.
        assert await arrive(b1, server, info, "b")
        await until(lambda: a3.get_id() not in server.get_network().connections)
        assert inbound.evicted == 1 and dict(inbound.held) == {"a": 2, "b": 1}
        # a, holding two, may not push out b's one; c, holding none, takes a's newest again.
        assert not await arrive(a4, server, info, "a")
        assert await arrive(c1, server, info, "c")
        assert dict(inbound.held) == {"a": 1, "b": 1, "c": 1} and inbound.evicted == 2
        # Everyone holds one: nobody is evicted for a newcomer no better off.
        assert not await arrive(d1, server, info, "d")
        assert inbound.evicted == 2


@pytest.mark.trio
async def test_slots_are_counted_per_address_and_in_all():
    swarm = SimpleNamespace(
        connection_config=SimpleNamespace(max_connections=5),
        _handle_inbound_connection=None,
        get_connections=list,
    )
    slots = InboundConnections(swarm, InboundLimits(per_address=2))
    assert [await slots._take("10.0.0.1") for _ in range(3)] == [True, True, False]
    assert await slots._take("10.0.0.2")  # another address is not held back by the first
    assert await slots._take("10.0.0.2")
    assert await slots._take(None)  # exempt: counted in all, never per address
    assert not await slots._take("10.0.0.3")  # five held in all, none registered to evict
    slots._release("10.0.0.1")
    assert await slots._take("10.0.0.3")
    assert slots.open == 5
