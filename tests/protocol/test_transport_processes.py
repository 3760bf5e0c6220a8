"""Integration across OS processes on 127.0.0.1: signed request/response both ways, and three
hosts gossiping with forwarding and validation."""

from __future__ import annotations

import peer_process as peer
import pytest
import trio

from protocol.envelope import Verified
from protocol.host import Host, pool_topic
from protocol.identity import Identity

POOL = "testpoolaaaaaaaaaaaaaaaa"


@pytest.mark.trio
async def test_two_processes_exchange_signed_messages():
    here, there = Identity.generate(), Identity.generate()
    async with Host.open(here, POOL) as host:
        calls: list[Verified] = []

        async def echo(request: Verified) -> peer.EchoReply:
            calls.append(request)
            return await peer.echo(request)

        host.serve(peer.ECHO_PROTOCOL, echo, peer.Echo, peer.EchoReply)
        async with peer.PeerProcess(seed=there.seed.hex(), pool=POOL, call=host.addrs[0]) as other:
            (addr,) = await other.line("ADDR")
            assert addr.endswith("/p2p/" + there.peer_id())

            # This process asks the other one: signed by us, answered and signed by it.
            reply = await host.request(
                addr, peer.ECHO_PROTOCOL, peer.Echo(n=1, data=b"x" * 50_000), peer.EchoReply
            )
            assert reply.signer == there.public_key
            assert reply.message == peer.EchoReply(n=2, signer=here.public_key, size=50_000)

            # The other process asked us (its --call): we saw its signature, it saw ours.
            assert await other.line("CALLED") == ["42", here.public_key.hex()]
            assert [c.signer for c in calls] == [there.public_key]
            assert calls[0].message.n == 41
        assert other.returncode == 0


@pytest.mark.trio
async def test_three_processes_gossip_with_forwarding_and_validation():
    publisher, forwarder = Identity.generate(), Identity.generate()
    topic = pool_topic(POOL, "versions")
    async with peer.PeerProcess(
        seed=publisher.seed.hex(), role="publisher", pool=POOL, topic=topic
    ) as a:
        (a_addr,) = await a.line("ADDR")
        async with peer.PeerProcess(
            seed=forwarder.seed.hex(), role="forwarder", pool=POOL, topic=topic, connect=a_addr
        ) as b:
            (b_addr,) = await b.line("ADDR")
            # c only accepts the publisher's announcements; the forwarder's own are refused by
            # c's validator (the forwarder itself accepts anyone's, so it does send them).
            async with (
                Host.open(Identity.generate(), POOL) as c,
                c.subscribe(topic, peer.Announcement, signer=publisher.public_key) as received,
            ):
                await c.connect(b_addr)
                got = await received.next(timeout_s=20)
                assert got.signer == publisher.public_key and got.message.version >= 1
                # Another one, not a duplicate (gossip does not promise order: a new peer is also
                # sent the recent history).
                later = await received.next(timeout_s=5)
                assert later.signer == publisher.public_key
                assert later.message.version != got.message.version
                # c never connected to a: everything it got came through b.
                assert c.connected_peers() == [forwarder.peer_id()]
                with trio.fail_after(5):
                    while c.stats.gossip_rejected == 0:
                        await trio.sleep(0.05)
        assert b.returncode == 0
    assert a.returncode == 0
