"""The relay hop's and the circuit end's gates against hostile peers, on loopback with real
libp2p hosts: what one RESERVE, a silent HOP stream, a STOP stream opened directly, or a
relayed peer's address list can make a hop or a node spend (docs/security.md, "NAT
traversal")."""

from __future__ import annotations

from typing import Any

import multiaddr
import pytest
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId, StopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from protocol.errors import TransportError
from protocol.identity import Identity
from shardcast.nat import (
    DCUTR_DIAL_BURST,
    HOP_WAITING_PER_PEER,
    HopLimits,
    NatConfig,
    P2PNode,
    _scoped_dcutr_class,
    open_node,
)

OK = 100  # circuit v2 Status.OK
ECHO = "/test/echo/1"


async def _answer(stream: Any, msg: Any, cls: type) -> Any:
    """Write `msg` and read the reply: None when the other end reset or closed instead."""
    try:
        with trio.fail_after(5):
            await write_delimited_msg(stream, msg)
            return await read_delimited_msg(stream, cls)
    except Exception:  # libp2p raises whatever the stream gave it: a refusal
        return None


async def _hop_stream(node: P2PNode, hop: P2PNode) -> Any:
    await node.raw.connect(info_from_p2p_addr(multiaddr.Multiaddr(hop.addrs[0])))
    return await node.raw.new_stream(ID.from_base58(hop.peer_id), [HOP_PROTOCOL_ID])


def test_hop_gives_a_slot_only_to_the_connected_peer() -> None:
    """A RESERVE naming another peer id is refused before py-libp2p sees it (it would reserve
    for the id named: one member took all 64 slots with made-up ids); one naming the sender,
    or none, is answered."""

    async def main() -> None:
        async with (
            open_node(Identity.generate(), hop=HopLimits(reservations=2)) as hop,
            open_node(Identity.generate(), dcutr=False) as member,
            open_node(Identity.generate(), dcutr=False) as honest,
        ):
            slots = hop._relay.resource_manager._reservations
            for _ in range(3):
                made_up = ID.from_base58(Identity.generate().peer_id()).to_bytes()
                msg = HopMessage(type=HopMessage.RESERVE, peer=PeerId(id=made_up))
                assert await _answer(await _hop_stream(member, hop), msg, HopMessage) is None
            assert not slots
            own = HopMessage(
                type=HopMessage.RESERVE, peer=PeerId(id=member.raw.get_id().to_bytes())
            )
            reply = await _answer(await _hop_stream(member, hop), own, HopMessage)
            assert reply is not None and reply.status == OK
            assert await honest.reserve(hop.addrs[0])
            assert set(slots) == {member.raw.get_id(), honest.raw.get_id()}

    trio.run(main)


def test_hop_silent_streams_hold_no_budget() -> None:
    """HOP streams that send nothing wait at most `first_message_s`, a few per peer, and count
    against neither budget: while two members hold more silent streams than `circuits_total`,
    an honest RESERVE is answered."""

    async def main() -> None:
        limits = HopLimits(first_message_s=0.5, circuits_total=2, reserves_total=2)
        async with (
            open_node(Identity.generate(), hop=limits) as hop,
            open_node(Identity.generate(), dcutr=False) as a,
            open_node(Identity.generate(), dcutr=False) as b,
            open_node(Identity.generate(), dcutr=False) as honest,
        ):
            silent = [
                await _hop_stream(n, hop) for n in (a, b) for _ in range(HOP_WAITING_PER_PEER)
            ]
            start = trio.current_time()
            with pytest.raises(Exception):  # noqa: B017 - one more is reset at once
                await (await _hop_stream(a, hop)).read(1)
            assert await honest.reserve(hop.addrs[0])
            with trio.fail_after(3):  # every silent stream is ended once its time is up
                for stream in silent:
                    with pytest.raises(Exception):  # noqa: B017 - reset or EOF, as libp2p has it
                        await stream.read(1)
            assert trio.current_time() - start < 2.0

    trio.run(main)


async def _open_stop(stranger: P2PNode, target: P2PNode) -> Any:
    """A STOP CONNECT sent straight to `target`, no hop between: its reply, or None."""
    await stranger.raw.connect(info_from_p2p_addr(multiaddr.Multiaddr(target.addrs[0])))
    stream = await stranger.raw.new_stream(ID.from_base58(target.peer_id), [STOP_PROTOCOL_ID])
    me = PeerId(id=stranger.raw.get_id().to_bytes())
    return await _answer(stream, StopMessage(type=StopMessage.CONNECT, peer=me), StopMessage)


def _stop_gate(node: P2PNode) -> Any:
    return node.raw.get_mux().handlers[STOP_PROTOCOL_ID].__self__


@pytest.mark.parametrize("is_hop", [False, True], ids=["node", "hop"])
def test_stop_is_refused_from_a_peer_that_gave_no_slot(is_hop: bool) -> None:
    """A relayed connection arrives only from a hop the node holds a slot on; a hop host holds
    none, so accepts none (py-libp2p accepted one per STOP stream from anyone: 362 fresh
    identities over 2 TCP connections)."""

    async def main() -> None:
        async with (
            open_node(Identity.generate(), hop=HopLimits() if is_hop else None) as target,
            open_node(Identity.generate(), dcutr=False) as stranger,
        ):
            assert await _open_stop(stranger, target) is None
            assert not _stop_gate(target).carrying()
            assert len(target.raw.get_network().get_connections()) == 1

    trio.run(main)


def test_relayed_connections_are_bounded_per_hop() -> None:
    """A node accepts `relayed_per_hop` connections through one hop; the next dialler through
    it is refused, and one through a hop the node never reserved on is refused too."""

    async def echo(stream: Any) -> None:
        await stream.write(await stream.read(4))
        await stream.close()

    async def main() -> None:
        config = NatConfig(relayed_per_hop=1, dial_timeout_s=3.0)
        async with (
            open_node(Identity.generate(), hop=HopLimits()) as hop,
            open_node(Identity.generate(), hop=HopLimits()) as other_hop,
            open_node(Identity.generate(), config=config, dcutr=False) as member,
            open_node(Identity.generate(), dcutr=False) as first,
            open_node(Identity.generate(), dcutr=False) as second,
        ):
            member.serve(ECHO, echo)
            circuit = await member.reserve(hop.addrs[0])
            first.learn(member.peer_id, [circuit])
            stream = await first.open_stream(member.peer_id, ECHO)
            await stream.write(b"ping")
            assert await stream.read(4) == b"ping"
            assert _stop_gate(member).carrying() == {hop.peer_id: 1}
            second.learn(member.peer_id, [circuit])
            with pytest.raises(TransportError):
                await second.open_stream(member.peer_id, ECHO)
            await member.raw.connect(info_from_p2p_addr(multiaddr.Multiaddr(other_hop.addrs[0])))
            from_other = await other_hop.raw.new_stream(
                ID.from_base58(member.peer_id), [STOP_PROTOCOL_ID]
            )
            me = PeerId(id=other_hop.raw.get_id().to_bytes())
            msg = StopMessage(type=StopMessage.CONNECT, peer=me)
            assert await _answer(from_other, msg, StopMessage) is None
            assert _stop_gate(member).carrying() == {hop.peer_id: 1}

    trio.run(main)


def _dials(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Dials that py-libp2p's DCUtR would send, recorded instead (nothing leaves)."""
    dialled: list[str] = []

    async def record(self: Any, peer_id: Any, addr: Any, *args: Any, **kw: Any) -> None:
        dialled.append(str(addr))

    monkeypatch.setattr(DCUtRProtocol, "_dial_peer", record)
    return dialled


async def _reporting_peer(raw: Any, ports: range) -> ID:
    """A made-up relayed peer that reported a public address per port."""
    peer = ID.from_base58(Identity.generate().peer_id())
    addrs = [multiaddr.Multiaddr(f"/ip4/1.2.3.4/tcp/{p}") for p in ports]
    raw.get_peerstore().add_addrs(peer, addrs, 3600)
    return peer


def test_dcutr_direct_tries_count_against_a_peers_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """py-libp2p's direct try before a punch dialled every reported address each round,
    outside the attempt budget; here each try is an attempt."""
    dialled = _dials(monkeypatch)

    async def main() -> None:
        async with open_node(Identity.generate(), dcutr=False) as node:
            dcutr = _scoped_dcutr_class()(node.raw, dial_timeout=1)
            peer = await _reporting_peer(node.raw, range(4001, 4003))
            for _ in range(5):
                assert not await dcutr._try_unilateral_upgrade(peer)
            assert len(dialled) == 3 * 2  # MAX_HOLE_PUNCH_ATTEMPTS tries of 2 addresses

    trio.run(main)


def test_dcutr_dials_share_one_budget_per_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """However many relayed identities report addresses, the host dials at most its bucket
    (`DCUTR_DIAL_BURST`, then 30 a minute): 10 identities once made 960 dials in 30 s."""
    dialled = _dials(monkeypatch)

    async def main() -> None:
        async with open_node(Identity.generate(), dcutr=False) as node:
            dcutr = _scoped_dcutr_class()(node.raw, dial_timeout=1)
            for first in range(5000, 5040, 8):
                peer = await _reporting_peer(node.raw, range(first, first + 8))
                await dcutr._try_unilateral_upgrade(peer)
            assert len(dialled) == DCUTR_DIAL_BURST

    trio.run(main)
