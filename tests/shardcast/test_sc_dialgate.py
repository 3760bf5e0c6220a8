"""A peer's own report of its addresses (identify) cannot aim a member's dials at this
machine or its LAN: real libp2p hosts on loopback, and a TCP service that counts who
connects to it."""

from __future__ import annotations

import pytest
import trio
from multiaddr import Multiaddr

from protocol.identity import Identity
from shardcast.nat import P2PNode, open_node

PUBLIC_HOP = "/ip4/8.8.8.8/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


async def _redial_after_report(member: P2PNode, peer: P2PNode, reported: str) -> bool:
    """Drop the connection to `peer`, leave `reported` as all the peerstore knows of it (as
    identify does with a peer's report), and open a stream without naming an address, as
    py-libp2p does when a connection is gone. Whether the stream opened."""
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    pid = ID.from_base58(peer.peer_id)
    await member.raw.disconnect(pid)
    store = member.raw.get_peerstore()
    store.clear_addrs(pid)
    store.add_addr(pid, Multiaddr(reported), 600)
    member.raw.get_network().unblock_peer(pid)
    with trio.move_on_after(10):
        try:
            await member.raw.new_stream(pid, [TProtocol("/swarmrl/test/1")])
            return True
        except Exception:
            return False
    return False


@pytest.mark.trio
async def test_a_reported_address_nearer_than_the_pool_is_never_dialled():
    from libp2p.peer.peerinfo import info_from_p2p_addr

    hits = 0

    async def service(stream: trio.SocketStream) -> None:
        nonlocal hits
        hits += 1
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    reported = f"/ip4/127.0.0.1/tcp/{listeners[0].socket.getsockname()[1]}"
    seen: dict[str, object] = {}
    async with (
        trio.open_nursery() as nursery,
        open_node(Identity.generate()) as member,
        open_node(Identity.generate()) as peer,
    ):
        await nursery.start(trio.serve_listeners, service, listeners)
        # A public pool: the member's hop is public, so loopback is out of reach...
        member.use_hops([PUBLIC_HOP])
        # ...except at an address our code names: the peer, dialled where it was told to be.
        named = info_from_p2p_addr(Multiaddr(peer.addrs[0]))
        await member.raw.connect(named)
        seen["named"] = bool(member.raw.get_network().connections.get(named.peer_id))
        seen["public pool opened"] = await _redial_after_report(member, peer, reported)
        seen["public pool hits"] = hits
        seen["refused"] = member.dial_gate.refused
        # A pool on this machine: loopback is where its members are, so the same report is
        # dialled (and the service sees it): the gate, not chance, kept it out above.
        member.hops.clear()
        member.use_hops([peer.addrs[0]])
        await _redial_after_report(member, peer, reported)
        seen["loopback pool dialled it"] = hits > 0  # py-libp2p retries: several
        nursery.cancel_scope.cancel()
    assert seen == {
        "named": True,
        "public pool opened": False,
        "public pool hits": 0,
        "refused": 1,
        "loopback pool dialled it": True,
    }
