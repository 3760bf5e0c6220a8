"""`node join --nat`: when a node re-serves its weights over libp2p through the coordinator's
relay hop instead of HTTP, and that a pool member then reaches it through the hop knowing
nothing but its peer id (one process, loopback)."""

import httpx
import pytest
import trio

from node.seeding import (
    NatMode,
    keep_slots,
    move_behind_hop,
    p2p_relay_url,
    seed_behind_nat,
    settle_reachability,
)
from protocol.host import Host
from protocol.identity import Identity
from shardcast.nat import HopLimits, Reachability, open_node, p2p_mounts, reserve_on
from shardcast.p2p import p2p_url
from shardcast.server import serve_app
from tests.integration.pool import free_port
from tests.shardcast.test_sc_nat_stream import BODY, member_app

ELSEWHERE = "/ip4/10.9.9.9/tcp/4001"
"""An address a node announces that is not where the hop sees it: as behind NAT."""


async def _advertised(mode: NatMode, announce: list[str] | None, hop: bool = True) -> str | None:
    """What a node announcing `announce` advertises in `mode`; when it is a p2p URL, also
    checks that a stranger to it fetches the seeder's bytes through the hop."""
    async with (
        open_node(Identity.generate(), hop=HopLimits() if hop else None) as coordinator,
        Host.open(Identity.generate(), "pool", announce=announce) as host,
        seed_behind_nat(host.libp2p, hops=coordinator.addrs) as node,
        trio.open_nursery() as nursery,
    ):
        url = await nursery.start(serve_app, member_app, "127.0.0.1", 0)
        advertised = await p2p_relay_url(node, url, coordinator.addrs, mode)
        if advertised is not None:
            assert advertised == p2p_url(host.peer_id)
            async with (
                open_node(Identity.generate()) as member,
                httpx.AsyncClient(mounts=p2p_mounts(member)) as http,
            ):
                member.use_hops(coordinator.addrs)  # no address of the node: the hop only
                assert (await http.get(f"{advertised}/v/1/f/x")).content == BODY
        nursery.cancel_scope.cancel()
    return advertised


@pytest.mark.parametrize(
    ("mode", "announce", "p2p"),
    [
        (NatMode.AUTO, [ELSEWHERE], True),  # the dial-back says private: over the hop
        (NatMode.AUTO, None, False),  # dialled back on loopback: public, HTTP will do
        (NatMode.ON, None, True),
        (NatMode.OFF, [ELSEWHERE], False),
    ],
)
def test_nat_mode_decides_what_the_node_advertises(mode, announce, p2p):
    advertised = trio.run(_advertised, mode, announce)
    assert (advertised is not None) is p2p


def test_nat_a_coordinator_without_a_hop_leaves_the_node_on_http():
    # No dial-back server (no verdict) in auto, no slot when forced on: HTTP either way.
    assert trio.run(_advertised, NatMode.AUTO, [ELSEWHERE], False) is None
    assert trio.run(_advertised, NatMode.ON, None, False) is None


async def _slot_after_a_hop_restart(renew: bool) -> bool:
    """A node takes a slot on a hop; the hop restarts (same key, same port) and forgets it.
    Whether the node holds a slot on the new hop 3 s later, with `keep_slots` running or not."""
    identity, port = Identity.generate(), free_port()
    listen = [f"/ip4/127.0.0.1/tcp/{port}"]
    async with (
        Host.open(Identity.generate(), "pool", announce=[ELSEWHERE]) as host,
        seed_behind_nat(host.libp2p) as node,
    ):
        async with open_node(identity, listen, hop=HopLimits()) as hop:
            hops = list(hop.addrs)
            assert await reserve_on(node, hops)
            assert hop.holds_slot(host.peer_id)
        async with open_node(identity, listen, hop=HopLimits()) as hop, trio.open_nursery() as n:
            assert not hop.holds_slot(host.peer_id)  # the restart forgot it
            if renew:
                n.start_soon(keep_slots, node, lambda: hops, 0.2)
            await trio.sleep(3.0)
            held = hop.holds_slot(host.peer_id)
            n.cancel_scope.cancel()
    return held


def test_nat_a_node_takes_its_slot_again_after_the_hop_restarts():
    assert trio.run(_slot_after_a_hop_restart, True)
    assert not trio.run(_slot_after_a_hop_restart, False)  # py-libp2p alone waits for expiry


async def _settled(first_hops: list[list[str]]) -> tuple[Reachability, Reachability | None]:
    """A node behind NAT (it announces an address the hop does not see it at) asks a hop
    again after a check without a verdict: `hops()` names each of `first_hops` in turn, then
    the live hop. What `settle_reachability` returned (3 tries), and what the node recorded."""
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{Identity.generate().peer_id()}"
    async with (
        open_node(Identity.generate(), hop=HopLimits()) as hop,
        Host.open(Identity.generate(), "pool", announce=[ELSEWHERE]) as host,
        seed_behind_nat(host.libp2p) as node,
    ):
        assert await node.reachability(dead) is Reachability.UNKNOWN  # the check at start
        asked = iter([[dead if a == "dead" else a for a in h] for h in first_hops])
        reach = await settle_reachability(node, lambda: next(asked, hop.addrs), 0.05, 3)
        return reach, node.verdict


def test_nat_a_check_without_a_verdict_is_asked_again_until_one_comes():
    # No address, then a dead hop, then the live one: private, on the third try.
    assert trio.run(_settled, [[], ["dead"]]) == (Reachability.PRIVATE, Reachability.PRIVATE)
    # Only dead hops for all three tries: still no verdict, and it stops asking.
    dead3 = [["dead"], ["dead"], ["dead"]]
    assert trio.run(_settled, dead3) == (Reachability.UNKNOWN, Reachability.UNKNOWN)


async def _moved(told_after_s: float | None, announce: list[str] | None) -> str | None:
    """A node whose seeder went out over HTTP after its dial-back check at start; the
    coordinator's checks say nobody reaches it after `told_after_s` (None: never, and it is
    given 2 s to move anyway; told, it has 30 s, for a loaded machine).
    What `move_behind_hop` returned; a p2p URL must also carry the seeder's bytes to a
    stranger through the hop."""
    async with (
        open_node(Identity.generate(), hop=HopLimits()) as coordinator,
        Host.open(Identity.generate(), "pool", announce=announce) as host,
        seed_behind_nat(host.libp2p, hops=coordinator.addrs) as node,
        trio.open_nursery() as nursery,
    ):
        url = await nursery.start(serve_app, member_app, "127.0.0.1", 0)
        assert await p2p_relay_url(node, url, coordinator.addrs, NatMode.AUTO) is None
        told = trio.Event()
        if told_after_s is not None:
            nursery.start_soon(_set_after, told, told_after_s)
        moved = None
        with trio.move_on_after(2.0 if told_after_s is None else 30.0):
            moved = await move_behind_hop(node, url, lambda: coordinator.addrs, told, 0.05, 3)
        if moved is not None:
            async with (
                open_node(Identity.generate()) as member,
                httpx.AsyncClient(mounts=p2p_mounts(member)) as http,
            ):
                member.use_hops(coordinator.addrs)
                assert (await http.get(f"{moved}/v/1/f/x")).content == BODY
        nursery.cancel_scope.cancel()
    return moved


async def _set_after(event: trio.Event, seconds: float) -> None:
    await trio.sleep(seconds)
    event.set()


def test_nat_a_public_verdict_gives_way_to_the_coordinators_checks():
    # Dialled back on loopback, the node is told "public" (as py-libp2p's AutoNAT server may
    # say of a node behind NAT); it stays on HTTP until the coordinator finds nobody there.
    assert trio.run(_moved, None, None) is None
    assert trio.run(_moved, 0.3, None) is not None


def test_nat_a_node_without_a_verdict_moves_on_a_private_one_alone():
    # A dead hop at start gives no verdict; asked again, the live hop says private: no word
    # from the coordinator needed.
    async def main() -> tuple[str | None, str]:
        dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{Identity.generate().peer_id()}"
        async with (
            open_node(Identity.generate(), hop=HopLimits()) as coordinator,
            Host.open(Identity.generate(), "pool", announce=[ELSEWHERE]) as host,
            seed_behind_nat(host.libp2p, hops=coordinator.addrs) as node,
            trio.open_nursery() as nursery,
        ):
            url = await nursery.start(serve_app, member_app, "127.0.0.1", 0)
            assert await node.reachability(dead) is Reachability.UNKNOWN
            moved = None
            with trio.move_on_after(30.0):  # returns once moved: the bound is for a loaded CI
                moved = await move_behind_hop(
                    node, url, lambda: coordinator.addrs, trio.Event(), 0.05, 3
                )
            nursery.cancel_scope.cancel()
        return moved, host.peer_id

    moved, peer_id = trio.run(main)
    assert moved == p2p_url(peer_id)
