"""What a request may cost before it is welcome: refusals decided on the frame header alone.

Real libp2p hosts on 127.0.0.1. The server's `request_bytes_read` counts what it read off request
streams, so "refused unread" is checked as "read stayed far below the body's size".
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import ClassVar

import peer_process as peer
import pytest
import trio

from protocol.envelope import ENVELOPE_OVERHEAD, Verified
from protocol.errors import RemoteError
from protocol.framing import READ_CHUNK
from protocol.host import ErrorCode, Host, HostConfig
from protocol.identity import Identity
from protocol.inflight import Share
from protocol.wire import Message

pytestmark = pytest.mark.trio

POOL = "testpoolaaaaaaaaaaaaaaaa"
MiB = 1024 * 1024
FAST = HostConfig(
    dial_timeout_s=2.0,
    dial_attempts=2,
    request_timeout_s=10.0,
    read_timeout_s=5.0,
    handler_timeout_s=10.0,
    write_timeout_s=5.0,
)
BLOB = "/swarmrl-test/blob/1"


class Blob(Message, tag="test-blob"):
    max_bytes: ClassVar[int] = 16 * MiB
    data: bytes = b""


def config(**changes: float) -> HostConfig:
    return HostConfig(**{**FAST.__dict__, **changes})


async def size_of(request: Verified[Blob]) -> peer.EchoReply:
    return peer.EchoReply(n=0, signer=request.signer, size=len(request.message.data))


async def refused(client: Host, server: Host, size: int) -> RemoteError:
    with pytest.raises(RemoteError) as e:
        await client.request(server.addrs[0], BLOB, Blob(data=b"x" * size), peer.EchoReply)
    return e.value


async def test_stranger_is_refused_before_its_body_is_read():
    async with (
        Host.open(Identity.generate(), POOL, config=FAST) as server,
        Host.open(Identity.generate(), POOL, config=FAST) as member,
        Host.open(Identity.generate(), POOL, config=FAST) as stranger,
    ):
        members = {member.identity.public_key}
        server.serve(BLOB, size_of, Blob, peer.EchoReply, allowed_signer=members.__contains__)
        err = await refused(stranger, server, 8 * MiB)
        assert err.code == ErrorCode.FORBIDDEN
        # Only what one read of the header pulled in: never the 8 MiB body.
        assert server.stats.request_bytes_read <= READ_CHUNK
        assert server.stats.refused == {"forbidden": 1} and server.stats.served == 0
        # The same frame from a member is read whole, which is what the counter would show.
        reply = await member.request(
            server.addrs[0], BLOB, Blob(data=b"x" * 8 * MiB), peer.EchoReply
        )
        assert reply.message.size == 8 * MiB
        assert server.stats.request_bytes_read > 8 * MiB
        assert server.inflight_bytes == 0


async def test_route_limit_from_configuration_refuses_unread():
    async with (
        Host.open(
            Identity.generate(), POOL, config=config(max_inflight_bytes_per_peer=2 * MiB)
        ) as server,
        Host.open(Identity.generate(), POOL, config=FAST) as client,
    ):
        server.serve(BLOB, size_of, Blob, peer.EchoReply, max_bytes=64 * 1024)
        server.serve("/swarmrl-test/blob-unset/1", size_of, Blob, peer.EchoReply)
        err = await refused(client, server, 100 * 1024)
        assert err.code == ErrorCode.TOO_LARGE and "65536" in err.detail
        reply = await client.request(
            server.addrs[0], BLOB, Blob(data=b"x" * 60_000), peer.EchoReply
        )
        assert reply.message.size == 60_000
        # Unconfigured, the route reads up to the per-peer budget, not the type's 16 MiB.
        with pytest.raises(RemoteError) as e:
            await client.request(
                server.addrs[0],
                "/swarmrl-test/blob-unset/1",
                Blob(data=b"x" * 3 * MiB),
                peer.EchoReply,
            )
        assert e.value.code == ErrorCode.TOO_LARGE and str(2 * MiB) in e.value.detail
        assert server.stats.request_bytes_read < 60_000 + 2 * READ_CHUNK
        with pytest.raises(ValueError, match="positive"):
            server.serve(BLOB, size_of, Blob, peer.EchoReply, max_bytes=0)


class Gate:
    """A handler that holds every request until opened, so reservations stay held."""

    def __init__(self) -> None:
        self.open = trio.Event()
        self.waiting = 0

    async def handler(self, request: Verified[Blob]) -> peer.EchoReply:
        self.waiting += 1
        await self.open.wait()
        return await size_of(request)


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.01)


async def send_all(client: Host, server: Host, sizes: list[int], outcomes: list[object]) -> None:
    """Send one Blob of each size at once; each outcome is the reply size or the error code."""

    async def one(size: int) -> None:
        try:
            reply = await client.request(
                server.addrs[0], BLOB, Blob(data=b"x" * size), peer.EchoReply
            )
            outcomes.append(reply.message.size)
        except RemoteError as e:
            outcomes.append(e)

    async with trio.open_nursery() as nursery:
        for size in sizes:
            nursery.start_soon(one, size)


FRAME = MiB + ENVELOPE_OVERHEAD  # a bound on the sealed size of a 1 MiB Blob


async def test_one_peer_cannot_hold_more_than_its_budget_in_flight():
    gate = Gate()
    budget = config(max_inflight_bytes_per_peer=3 * FRAME)
    async with (
        Host.open(Identity.generate(), POOL, config=budget) as server,
        Host.open(Identity.generate(), POOL, config=FAST) as greedy,
        Host.open(Identity.generate(), POOL, config=FAST) as other,
        trio.open_nursery() as nursery,
    ):
        server.serve(BLOB, gate.handler, Blob, peer.EchoReply)
        greedy_outcomes: list[object] = []
        other_outcomes: list[object] = []
        nursery.start_soon(send_all, greedy, server, [MiB] * 6, greedy_outcomes)
        # Three are admitted and held; the other three are refused unread.
        await wait_until(lambda: gate.waiting == 3 and len(greedy_outcomes) == 3)
        assert all(e.code == ErrorCode.PEER_BUSY for e in greedy_outcomes)
        assert all(e.retry_after_s == FAST.inflight_retry_s for e in greedy_outcomes)
        assert server.inflight_bytes > 2 * MiB
        # Another peer has a budget of its own.
        nursery.start_soon(send_all, other, server, [MiB], other_outcomes)
        await wait_until(lambda: gate.waiting == 4)
        gate.open.set()
        await wait_until(lambda: len(greedy_outcomes) == 6 and len(other_outcomes) == 1)
        assert sorted(o for o in greedy_outcomes if isinstance(o, int)) == [MiB] * 3
        assert other_outcomes == [MiB]
        assert server.stats.refused == {"peer_busy": 3}
        # Three 1 MiB bodies refused: had they been read, the count would be above 7 MiB.
        assert server.stats.request_bytes_read < 4 * MiB + 3 * READ_CHUNK
        assert server.inflight_bytes == 0 and len(server._inflight) == 0


async def test_all_peers_together_cannot_exceed_the_host_budget():
    gate = Gate()
    budget = config(
        max_inflight_bytes_per_peer=4 * FRAME,
        max_inflight_bytes=4 * FRAME,
        inflight_small_reserve=0,
    )
    async with (
        Host.open(Identity.generate(), POOL, config=budget) as server,
        Host.open(Identity.generate(), POOL, config=FAST) as first,
        Host.open(Identity.generate(), POOL, config=FAST) as second,
        trio.open_nursery() as nursery,
    ):
        server.serve(BLOB, gate.handler, Blob, peer.EchoReply)
        outcomes: list[object] = []
        nursery.start_soon(send_all, first, server, [MiB] * 3, outcomes)
        await wait_until(lambda: gate.waiting == 3)
        nursery.start_soon(send_all, second, server, [MiB] * 3, outcomes)
        await wait_until(lambda: gate.waiting == 4 and len(outcomes) == 2)
        assert [e.code for e in outcomes] == [ErrorCode.OVERLOADED] * 2
        gate.open.set()
        await wait_until(lambda: len(outcomes) == 6)
        assert server.inflight_bytes == 0
        # Once the budget is back, the refused peer is served.
        reply = await second.request(server.addrs[0], BLOB, Blob(data=b"x" * MiB), peer.EchoReply)
        assert reply.message.size == MiB


async def test_large_frames_leave_the_reserve_to_small_requests():
    # Large frames may fill the total but its reserve: a control-sized request (a heartbeat,
    # a join) still gets through while they are held, and one more large frame does not.
    gate = Gate()
    budget = config(
        max_inflight_bytes_per_peer=4 * FRAME,
        max_inflight_bytes=5 * FRAME,
        inflight_small_reserve=2 * FRAME,
    )
    async with (
        Host.open(Identity.generate(), POOL, config=budget) as server,
        Host.open(Identity.generate(), POOL, config=FAST) as large,
        Host.open(Identity.generate(), POOL, config=FAST) as small,
        trio.open_nursery() as nursery,
    ):
        server.serve(BLOB, gate.handler, Blob, peer.EchoReply)
        outcomes: list[object] = []
        nursery.start_soon(send_all, large, server, [MiB] * 4, outcomes)
        await wait_until(lambda: gate.waiting == 3 and len(outcomes) == 1)
        assert [e.code for e in outcomes] == [ErrorCode.OVERLOADED]  # 3 of 5 frames: the rest
        small_outcomes: list[object] = []
        nursery.start_soon(send_all, small, server, [1000] * 8, small_outcomes)
        await wait_until(lambda: gate.waiting == 11)  # every small request admitted
        gate.open.set()
        await wait_until(lambda: len(outcomes) == 4 and len(small_outcomes) == 8)
        assert small_outcomes == [1000] * 8
        assert server.inflight_bytes == 0


async def test_peers_of_one_class_share_one_budget():
    # However many keys the class has, its frames together hold at most its share; peers
    # outside it keep their own budgets.
    gate = Gate()
    crowd = [Identity.generate() for _ in range(3)]
    crowd_keys = {i.public_key for i in crowd}
    newcomers = Share("newcomers", 2 * FRAME)
    async with (
        Host.open(Identity.generate(), POOL, config=FAST) as server,
        Host.open(crowd[0], POOL, config=FAST) as a,
        Host.open(crowd[1], POOL, config=FAST) as b,
        Host.open(crowd[2], POOL, config=FAST) as c,
        Host.open(Identity.generate(), POOL, config=FAST) as trusted,
        trio.open_nursery() as nursery,
    ):
        server.serve(
            BLOB,
            gate.handler,
            Blob,
            peer.EchoReply,
            share_of=lambda key: newcomers if key in crowd_keys else None,
        )
        outcomes: list[object] = []
        nursery.start_soon(send_all, a, server, [MiB], outcomes)
        nursery.start_soon(send_all, b, server, [MiB], outcomes)
        await wait_until(lambda: gate.waiting == 2)
        nursery.start_soon(send_all, c, server, [MiB], outcomes)
        await wait_until(lambda: len(outcomes) == 1)
        assert outcomes[0].code == ErrorCode.OVERLOADED  # c's own budget is untouched
        assert 2 * MiB < server._inflight.held_by_share("newcomers") <= newcomers.budget
        nursery.start_soon(send_all, trusted, server, [MiB, MiB], outcomes)
        await wait_until(lambda: gate.waiting == 4)
        gate.open.set()
        await wait_until(lambda: len(outcomes) == 5)
        assert sorted(o for o in outcomes if isinstance(o, int)) == [MiB] * 4
        assert server.inflight_bytes == 0 and server._inflight.held_by_share("newcomers") == 0


async def test_budget_is_released_whatever_becomes_of_the_request():
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    async def failing(request: Verified[Blob]) -> peer.EchoReply:
        raise RuntimeError("a handler bug")

    async with (
        Host.open(Identity.generate(), POOL, config=config(read_timeout_s=1.0)) as server,
        Host.open(Identity.generate(), POOL, config=FAST) as client,
    ):
        server.serve(BLOB, failing, Blob, peer.EchoReply)
        assert (await refused(client, server, MiB)).code == ErrorCode.INTERNAL
        assert server.inflight_bytes == 0
        # A body that never arrives in full: the header reserved 1 MiB, the stream stalls.
        stream = await client._host.new_stream(ID.from_base58(server.peer_id), [TProtocol(BLOB)])
        await stream.write(struct.pack(">I", MiB) + b"abc")
        await wait_until(lambda: server.inflight_bytes == MiB)
        await wait_until(lambda: server.stats.refused.get("timeout") == 1)
        assert server.inflight_bytes == 0 and len(server._inflight) == 0
        await stream.reset()


async def test_a_peer_banned_while_its_body_arrives_is_refused():
    answers = iter([True, False])  # admitted on the header, banned by the time the body is in

    async with (
        Host.open(Identity.generate(), POOL, config=FAST) as server,
        Host.open(Identity.generate(), POOL, config=FAST) as client,
    ):
        server.serve(BLOB, size_of, Blob, peer.EchoReply, allowed_signer=lambda key: next(answers))
        err = await refused(client, server, 1000)
        assert err.code == ErrorCode.FORBIDDEN
        assert server.stats.served == 0
