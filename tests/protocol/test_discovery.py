"""Discovery: from a pool id and one non-coordinator member to the coordinator and the spec."""

from __future__ import annotations

import time
from functools import partial
from typing import ClassVar

import peer_process as peer
import pytest
import trio

from protocol import poolspec
from protocol.discovery import (
    DISCOVERY_PROTOCOL,
    MAX_RECORD_TTL_S,
    RECORD_SKEW_S,
    RECORD_TTL_S,
    PoolBook,
    PoolInfo,
    PoolQuery,
    PoolRecord,
    discover,
    follow_pool_record,
    make_pool_record,
    open_pool_record,
    refresh_record,
    serve_discovery,
)
from protocol.envelope import Verified, seal
from protocol.errors import DiscoveryError, ProtocolError, SwarmError
from protocol.host import Host, HostConfig
from protocol.identity import Identity
from protocol.wire import Message

FAST = HostConfig(dial_timeout_s=2.0, dial_attempts=2, request_timeout_s=5.0)
JOIN = "/swarmrl-test/join/1"


class Join(Message, tag="test-join"):
    max_bytes: ClassVar[int] = 256


class Welcome(Message, tag="test-welcome"):
    max_bytes: ClassVar[int] = 256
    name: str


def make_spec(coordinator: Identity, name: str = "test-pool") -> poolspec.PoolSpec:
    return poolspec.from_dict(
        {"name": name, "coordinator": {"public_key": coordinator.public_key.hex()}}
    )


def test_pool_record_checks():
    coordinator, other = Identity.generate(), Identity.generate()
    spec = make_spec(coordinator)
    pool = poolspec.pool_id(spec)
    record = make_pool_record(coordinator, spec, ["/ip4/127.0.0.1/tcp/4001"])
    location = open_pool_record(record, pool)
    assert location.spec == spec
    assert location.coordinator_peer_id == coordinator.peer_id()
    assert location.coordinator_addrs == [f"/ip4/127.0.0.1/tcp/4001/p2p/{coordinator.peer_id()}"]

    with pytest.raises(ProtocolError, match="not otherpool"):
        open_pool_record(record, "otherpoolaaaaaaaaaaaaaaa")
    # Someone else's record for the same spec: right hash, wrong signer.
    forged = seal(other, pool, open_record_body(record))
    with pytest.raises(ProtocolError, match="not by the pool's coordinator"):
        open_pool_record(forged, pool)
    # A spec that does not hash to the pool id, signed by the key it names.
    evil_spec = make_spec(other, name="evil")
    evil = make_pool_record(other, evil_spec, ["/ip4/127.0.0.1/tcp/1"])
    with pytest.raises(ProtocolError):
        open_pool_record(evil, pool)
    with pytest.raises(SwarmError, match="not the coordinator"):
        make_pool_record(other, spec, ["/ip4/127.0.0.1/tcp/1"])
    # One flipped bit in the body: the signature no longer holds.
    tampered = bytearray(record)
    tampered[record.index(b"/ip4/127.0.0.1/tcp/4001") + 19] ^= 1
    with pytest.raises(ProtocolError, match="signature"):
        open_pool_record(bytes(tampered), pool)


def test_pool_record_expires_and_may_not_come_from_the_future():
    coordinator = Identity.generate()
    spec = make_spec(coordinator)
    pool = poolspec.pool_id(spec)
    addrs = ["/ip4/127.0.0.1/tcp/4001"]
    now = time.time()
    record = make_pool_record(coordinator, spec, addrs, now=now, ttl_s=600)
    location = open_pool_record(record, pool, now=now + 600)
    assert location.expires_ms - location.issued_ms == 600_000
    open_pool_record(record, pool, now=now + 600 + RECORD_SKEW_S - 1)  # within the slack
    with pytest.raises(ProtocolError, match="expired"):
        open_pool_record(record, pool, now=now + 600 + RECORD_SKEW_S + 1)
    assert location.expired(now + 600 + RECORD_SKEW_S + 1)
    ahead = make_pool_record(coordinator, spec, addrs, now=now + RECORD_SKEW_S + 5)
    with pytest.raises(ProtocolError, match="future"):
        open_pool_record(ahead, pool, now=now)
    # A record claiming more than the longest lifetime, signed by the coordinator itself.
    body = open_record_body(record)
    forever = seal(
        coordinator,
        pool,
        PoolRecord(spec=body.spec, addrs=body.addrs, expires_ms=2**62),
        now=now,
    )
    with pytest.raises(ProtocolError, match="lifetime"):
        open_pool_record(forever, pool, now=now)
    with pytest.raises(ValueError):
        make_pool_record(coordinator, spec, addrs, ttl_s=MAX_RECORD_TTL_S + 1)


def test_pool_book_keeps_the_newest_valid_record():
    coordinator = Identity.generate()
    spec = make_spec(coordinator)
    pool = poolspec.pool_id(spec)
    now = time.time()
    older = make_pool_record(coordinator, spec, ["/ip4/127.0.0.1/tcp/1"], now=now - 60)
    newer = make_pool_record(coordinator, spec, ["/ip4/127.0.0.1/tcp/2"], now=now)
    book = PoolBook(pool)
    assert book.learn(newer).record == newer
    assert book.learn(older).record == newer  # an older record never replaces a newer one
    assert book.location is not None and "/tcp/2/" in book.location.coordinator_addrs[0]
    then = now - RECORD_TTL_S - 2 * RECORD_SKEW_S
    stale = make_pool_record(coordinator, spec, ["/ip4/127.0.0.1/tcp/3"], now=then)
    other = PoolBook(pool)
    other.learn(stale, now=then)  # valid when learned ...
    assert other.location is None  # ... and forgotten once expired
    with pytest.raises(ProtocolError, match="expired"):
        other.learn(stale)


def open_record_body(record: bytes) -> PoolRecord:
    from protocol.envelope import Envelope
    from protocol.wire import decode

    return decode(decode(record, Envelope, max_bytes=1 << 20).body, PoolRecord)


@pytest.mark.trio
async def test_newcomer_finds_coordinator_through_non_coordinator_member():
    coordinator = Identity.generate()
    spec = make_spec(coordinator)
    pool = poolspec.pool_id(spec)
    async with (
        Host.open(coordinator, pool, config=FAST) as coord,
        Host.open(Identity.generate(), pool, config=FAST) as member,
        Host.open(Identity.generate(), pool, config=FAST) as newcomer,
    ):
        coord_book = PoolBook(pool)
        coord_book.learn(make_pool_record(coordinator, spec, coord.addrs))
        serve_discovery(coord, coord_book)

        async def welcome(request: Verified[Join]) -> Welcome:
            return Welcome(name=spec.name)

        coord.serve(JOIN, welcome, Join, Welcome)

        # The member joined earlier through the coordinator and now serves what it learned.
        member_book = PoolBook(pool)
        await discover(member, coord.addrs, book=member_book)
        serve_discovery(member, member_book)

        # The newcomer knows the pool id and the member only.
        newcomer_book = PoolBook(pool)
        found = await discover(newcomer, member.addrs, book=newcomer_book)
        assert poolspec.pool_id(found.spec) == pool and found.spec == spec
        assert found.coordinator_peer_id == coordinator.peer_id()
        # The address found really is the coordinator's: a signed answer comes back from it.
        reply = await newcomer.request(found.coordinator_addrs[0], JOIN, Join(), Welcome)
        assert reply.signer == coordinator.public_key and reply.message.name == spec.name
        # And the newcomer can now answer the next one.
        assert newcomer_book.location is not None
        assert newcomer_book.location.coordinator_addrs == found.coordinator_addrs
        assert member.addrs[0] in newcomer_book.peers()


@pytest.mark.trio
async def test_walks_past_members_without_a_record_and_past_liars():
    coordinator, liar_key = Identity.generate(), Identity.generate()
    spec = make_spec(coordinator)
    pool = poolspec.pool_id(spec)
    async with (
        Host.open(coordinator, pool, config=FAST) as coord,
        Host.open(Identity.generate(), pool, config=FAST) as ignorant,
        Host.open(liar_key, pool, config=FAST) as liar,
        Host.open(Identity.generate(), pool, config=FAST) as newcomer,
    ):
        good = PoolBook(pool)
        good.learn(make_pool_record(coordinator, spec, coord.addrs))
        serve_discovery(coord, good)

        # The liar claims our pool id for its own spec (which names the liar as coordinator, so
        # the signature matches the key inside), pointing at itself.
        evil_spec = make_spec(liar_key, "evil")
        evil_record = seal(
            liar_key,
            pool,
            PoolRecord(
                spec=poolspec.canonical_bytes(evil_spec),
                addrs=[liar.addrs[0]],
                expires_ms=int(time.time() * 1000) + 60_000,
            ),
        )

        async def lie(request: Verified[PoolQuery]) -> PoolInfo:
            return PoolInfo(record=evil_record, peers=[])

        liar.serve(DISCOVERY_PROTOCOL, lie, PoolQuery, PoolInfo)

        # The ignorant member has no record yet but knows the liar and the coordinator.
        ignorant_book = PoolBook(pool)
        ignorant_book.add_peer(coord.addrs[0])
        ignorant_book.add_peer(liar.addrs[0])  # newest first: the liar is asked first
        serve_discovery(ignorant, ignorant_book)

        found = await discover(newcomer, ignorant.addrs)
        assert found.coordinator_peer_id == coordinator.peer_id()
        assert found.spec == spec

        # With only the liar to ask, discovery fails and says why.
        with pytest.raises(DiscoveryError, match="hashes to"):
            await discover(newcomer, liar.addrs)


@pytest.mark.trio
async def test_peers_an_answer_names_are_dialled_no_nearer_than_the_bootstrap(monkeypatch):
    # A member's answer lists peers by its own word: a liar listed this machine's loopback
    # services and LAN hosts, had the newcomer dial each, and timed the dials. Here the
    # bootstrap peer counts as a private one (as on a LAN), so the coordinator it names at
    # 127.0.0.1 is never dialled, and discovery says it found nothing.
    import protocol.discovery
    from shardcast.scope import Scope

    coordinator = Identity.generate()
    spec = make_spec(coordinator)
    pool = poolspec.pool_id(spec)
    async with (
        Host.open(coordinator, pool, config=FAST) as coord,
        Host.open(Identity.generate(), pool, config=FAST) as member,
        Host.open(Identity.generate(), pool, config=FAST) as newcomer,
    ):
        book = PoolBook(pool)
        book.learn(make_pool_record(coordinator, spec, coord.addrs))
        serve_discovery(coord, book)
        members_book = PoolBook(pool)
        members_book.add_peer(coord.addrs[0])  # no record of its own: it names the coordinator
        serve_discovery(member, members_book)
        assert (await discover(newcomer, member.addrs)).spec == spec  # loopback pool: followed
        monkeypatch.setattr(protocol.discovery, "dial_floor", lambda bootstrap: Scope.PRIVATE)
        with pytest.raises(DiscoveryError, match="has no pool record"):
            await discover(newcomer, member.addrs)


@pytest.mark.trio
async def test_no_bootstrap_or_nobody_answering_is_a_clear_error():
    coordinator = Identity.generate()
    pool = poolspec.pool_id(make_spec(coordinator))
    async with Host.open(Identity.generate(), pool, config=FAST) as newcomer:
        with pytest.raises(DiscoveryError, match="no bootstrap"):
            await discover(newcomer, [])
        async with Host.open(Identity.generate(), pool, config=FAST) as stranger:
            dead = stranger.addrs[0]
            # Reachable but not serving discovery.
            with pytest.raises(DiscoveryError, match="does not serve"):
                await discover(newcomer, [dead])
        start = trio.current_time()
        with pytest.raises(DiscoveryError, match="could not reach"):
            await discover(newcomer, [dead], query_timeout_s=3)
        assert trio.current_time() - start < 5


@pytest.mark.trio
async def test_discovery_across_processes_through_a_member():
    """Coordinator and member are separate OS processes; we know the pool id and the member."""
    coordinator, member_key = Identity.generate(), Identity.generate()
    pool = poolspec.pool_id(peer.coordinator_spec(coordinator))
    async with peer.PeerProcess(seed=coordinator.seed.hex(), role="coordinator") as coord:
        assert await coord.line("POOL") == [pool]
        (coord_addr,) = await coord.line("ADDR")
        async with peer.PeerProcess(
            seed=member_key.seed.hex(), role="member", pool=pool, bootstrap=coord_addr
        ) as member:
            (member_addr,) = await member.line("ADDR")  # printed once it has discovered
            async with Host.open(Identity.generate(), pool, config=FAST) as newcomer:
                found = await discover(newcomer, [member_addr])
                assert newcomer.connected_peers() == [member_key.peer_id()]
                assert poolspec.pool_id(found.spec) == pool
                assert found.coordinator_peer_id == coordinator.peer_id()
                assert found.coordinator_addrs == [coord_addr]
                reply = await newcomer.request(
                    found.coordinator_addrs[0], peer.ECHO_PROTOCOL, peer.Echo(n=1), peer.EchoReply
                )
                assert reply.signer == coordinator.public_key
        assert member.returncode == 0
    assert coord.returncode == 0


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.05)


@pytest.mark.trio
async def test_records_are_refreshed_and_members_follow_them():
    coordinator = Identity.generate()
    spec = make_spec(coordinator)
    pool = poolspec.pool_id(spec)
    async with (
        Host.open(coordinator, pool, config=FAST) as coord,
        Host.open(Identity.generate(), pool, config=FAST) as member,
        Host.open(Identity.generate(), pool, config=FAST) as newcomer,
        trio.open_nursery() as nursery,
    ):
        coord_book = PoolBook(pool)
        first = await nursery.start(
            partial(refresh_record, coordinator, spec, coord, coord_book, ttl_s=2.0, every_s=0.2)
        )
        serve_discovery(coord, coord_book)
        assert coord_book.location == first
        # The member knows the coordinator only through the record (no peers to pass on).
        member_book = PoolBook(pool)
        learned = member_book.learn(first.record)
        serve_discovery(member, member_book)
        # The member holds a record issued before the coordinator's next one ...
        await wait_until(lambda: coord_book.location.issued_ms > learned.issued_ms)
        # ... so asking for something newer than it through the member alone fails, and says so.
        with pytest.raises(DiscoveryError, match="newer"):
            await discover(newcomer, member.addrs, newer_than_ms=learned.issued_ms)
        # Following the record, the member fetches a newer one by half-life.
        nursery.start_soon(follow_pool_record, member, member_book)
        await wait_until(lambda: member_book.location.issued_ms > learned.issued_ms)
        found = await discover(newcomer, member.addrs, newer_than_ms=learned.issued_ms)
        assert found.coordinator_peer_id == coordinator.peer_id()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_discover_again_with_a_book_asks_the_members_it_knows():
    coordinator = Identity.generate()
    spec = make_spec(coordinator)
    pool = poolspec.pool_id(spec)
    async with (
        Host.open(coordinator, pool, config=FAST) as coord,
        Host.open(Identity.generate(), pool, config=FAST) as node,
    ):
        coord_book = PoolBook(pool)
        coord_book.learn(make_pool_record(coordinator, spec, coord.addrs))
        serve_discovery(coord, coord_book)
        book = PoolBook(pool)
        first = await discover(node, coord.addrs, book=book)
        # No bootstrap this time (say it went away): the book remembers whom to ask.
        coord_book.learn(make_pool_record(coordinator, spec, coord.addrs, now=time.time() + 1))
        again = await discover(node, [], book=book, newer_than_ms=first.issued_ms)
        assert again.issued_ms > first.issued_ms and book.location == again


@pytest.mark.trio
async def test_an_expired_record_is_not_passed_on():
    coordinator = Identity.generate()
    spec = make_spec(coordinator)
    pool = poolspec.pool_id(spec)
    async with (
        Host.open(Identity.generate(), pool, config=FAST) as member,
        Host.open(Identity.generate(), pool, config=FAST) as newcomer,
    ):
        book = PoolBook(pool)
        issued = time.time() - RECORD_TTL_S - 2 * RECORD_SKEW_S
        book.learn(
            make_pool_record(coordinator, spec, ["/ip4/127.0.0.1/tcp/1"], now=issued), now=issued
        )
        serve_discovery(member, book)
        with pytest.raises(DiscoveryError, match="no pool record"):
            await discover(newcomer, member.addrs)
