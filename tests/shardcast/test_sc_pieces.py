"""Sub-shard pieces: the unit of transfer, verification, blame and cut-through, and what a
swarm member does with its peers' promises."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import httpx
import pytest
import trio
from sc_helpers import POOL_ID, make_checkpoint, nudge_checkpoint, same_tree
from test_sc_hostile import client, fault_proxy

from protocol.identity import Identity
from shardcast.fetcher import FetchPolicy, ShardFetcher, ShardJob, Swarming
from shardcast.manifest import Manifest, piece_size_for
from shardcast.origin import Origin
from shardcast.relay import Relay
from shardcast.server import serve_app
from shardcast.sources import SourcePicker
from shardcast.store import StoredVersion

SHARD = 256 * 1024
PIECE = 16 * 1024
WEIGHTS = "model.safetensors"


MiB = 2**20


def test_pieces_grow_with_the_payload_to_128_to_256_per_version() -> None:
    KiB = 1024
    assert piece_size_for(4 * MiB, 16 * MiB) == 256 * KiB  # a delta: 16 pieces
    assert piece_size_for(32 * MiB + 25, 16 * MiB) == 256 * KiB  # a 32 MiB checkpoint's 129
    assert piece_size_for(64 * MiB - 1, 16 * MiB) == 256 * KiB  # 512 KiB: under 128 pieces
    assert piece_size_for(64 * MiB, 16 * MiB) == 512 * KiB
    assert piece_size_for(256 * MiB, 16 * MiB) == 2 * MiB
    assert piece_size_for(512 * MiB - 1, 16 * MiB) == 2 * MiB
    assert piece_size_for(512 * MiB, 16 * MiB) == 4 * MiB
    assert piece_size_for(64 * 2**30, 16 * MiB) == 8 * MiB  # at most half a shard
    assert piece_size_for(2**30, 24 * MiB) == 8 * MiB  # a third of a shard: it divides it
    assert piece_size_for(2**30, 20 * MiB) == 4 * MiB  # 8 MiB would not divide 20
    assert piece_size_for(2**30, MiB) == 512 * KiB  # 1 MiB shards: half of one
    assert piece_size_for(2**30, 256 * KiB) is None  # shards no larger than a piece: shards


@pytest.mark.trio
async def test_an_origin_sizes_pieces_by_each_versions_payload(
    tmp_path: Path, identity: Identity
) -> None:
    """A 70 MB full version goes in 512 KiB pieces and the small delta after it in 256 KiB
    ones, each hashed at its size: a client fetches both exactly."""
    origin = Origin(tmp_path / "o", identity, POOL_ID)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(origin.serve)
        ck = make_checkpoint(tmp_path / "ck", mb=70)
        full = await origin.publish(ck, 1, delta=False)
        assert full.piece_size == MiB // 2
        assert len(full.payload[0].pieces) == -(-full.payload[0].size // (MiB // 2))
        nudge_checkpoint(ck, 1)
        delta = await origin.publish(ck, 2)
        assert delta.base == 1 and delta.piece_size == MiB // 4
        c = client([url], tmp_path / "c", identity)
        for version in (1, 2):
            r = await c.fetch(version)
            assert not r.bad_shards and same_tree(r.path, ck) == (version == 2)
        await c.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_bad_piece_is_caught_alone_and_blamed(tmp_path: Path, identity: Identity) -> None:
    """The only source flips one byte inside the first shard, once: the fetch blames exactly
    the piece holding that byte (not the shard), refetches that piece and ends with exact
    files."""
    origin = Origin(tmp_path / "o", identity, POOL_ID, shard_size=SHARD, piece_size=PIECE)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(origin.serve)
        ck = make_checkpoint(tmp_path / "ck", mb=0.5)
        m = await origin.publish(ck, 1)
        assert m.piece_size == PIECE
        at = 3 * PIECE + 100
        bad = await nursery.start(
            serve_app, fault_proxy([url], "flip_at", flip_at=at), "127.0.0.1", 0
        )
        c = client([bad], tmp_path / "c", identity)
        r = await c.fetch(1)
        assert same_tree(r.path, ck)
        assert [(b.source, b.payload, b.shard) for b in r.bad_shards] == [
            (bad, WEIGHTS, at // PIECE)
        ]
        assert c.picker.stats[bad].corrupt == 1
        await c.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_relay_serves_a_piece_before_its_shard_is_complete(
    tmp_path: Path, identity: Identity
) -> None:
    """Cut-through at piece granularity: the relay hands out a verified piece while the
    origin has not yet sent the whole shard it belongs to."""
    origin = Origin(
        tmp_path / "o", identity, POOL_ID, shard_size=SHARD, piece_size=PIECE, rate=200_000
    )
    async with trio.open_nursery() as nursery:
        url = await nursery.start(origin.serve)
        relay = Relay([url], tmp_path / "r", public_key=identity.public_key, pool_id=POOL_ID)
        r_url = await nursery.start(relay.run)
        await origin.publish(make_checkpoint(tmp_path / "ck", mb=0.5), 1)
        async with httpx.AsyncClient(timeout=30) as http:
            for _ in range(200):
                if (await http.get(f"{r_url}/v/1/have")).status_code == 200:
                    break
                await trio.sleep(0.05)
            first = f"bytes=0-{PIECE - 1}"
            got = await http.get(f"{r_url}/v/1/f/{WEIGHTS}", headers={"Range": first})
        sent = origin.app.state.served.by_version[1]
        assert got.status_code == 206 and len(got.content) == PIECE
        assert sent < SHARD, sent  # shard granularity would need the whole shard first
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_old_manifests_keep_shard_granularity(tmp_path: Path, identity: Identity) -> None:
    """Publishing without pieces gives the manifest of before (shards are the unit)."""
    origin = Origin(tmp_path / "o", identity, POOL_ID, shard_size=SHARD, piece_size=None)
    m = await origin.publish(make_checkpoint(tmp_path / "ck", mb=0.5), 1)
    assert m.piece_size is None and m.unit == SHARD
    assert all(p.pieces == [] for p in m.payload)


async def _unheld_version(
    tmp_path: Path, identity: Identity, folder: Path
) -> tuple[Manifest, StoredVersion]:
    """A published version's manifest, and a store entry for it at `folder` holding none of
    its units yet."""
    origin = Origin(tmp_path / "o", identity, POOL_ID, shard_size=SHARD, piece_size=PIECE)
    m = await origin.publish(make_checkpoint(tmp_path / "ck", mb=0.5), 1)
    return m, StoredVersion(m, b"", folder, complete=False)


@pytest.mark.trio
async def test_a_promise_is_counted_and_cleared_when_held(
    tmp_path: Path, identity: Identity
) -> None:
    m, sv = await _unheld_version(tmp_path, identity, tmp_path / "x")
    first = m.payload[0].name  # bit 0 of the bitfields
    sv.promise(first, 0)
    sv.promise(first, 0)  # once is enough
    assert (sv.changes, sv.soon_bitfield()[:2]) == (1, "80")
    sv.mark(first, 0)
    assert (sv.changes, sv.soon_bitfield()[:2], sv.bitfield()[:2]) == (2, "00", "80")


def _fetcher(promised: set[int], preferred: set[int], members: int = 1) -> ShardFetcher:
    swarm = Swarming(
        holders=lambda job: set(),
        seeds={"http://seed"},
        members=lambda: members,
        promised=lambda job: job.index in promised,
        preferred=lambda job: job.index in preferred,
        reserved=lambda job: job.index not in preferred,
    )
    picker = SourcePicker(["http://seed"])
    return ShardFetcher(httpx.AsyncClient(), picker, FetchPolicy(), swarm=swarm)


def _jobs(n: int) -> deque[ShardJob]:
    return deque(ShardJob("f", i, i * PIECE, PIECE, "0" * 64, Path("f")) for i in range(n))


@pytest.mark.trio
async def test_a_promised_piece_is_left_to_the_peer_fetching_it() -> None:
    fetcher = _fetcher(promised={0, 1, 2}, preferred=set())
    queue = _jobs(4)
    assert fetcher._next_job(queue).index == 3
    assert fetcher._next_job(queue) is None  # only promised ones left: wait for a holder


@pytest.mark.trio
async def test_first_copies_from_a_seed_are_this_members_share_first() -> None:
    fetcher = _fetcher(promised=set(), preferred={5})
    assert fetcher._next_job(_jobs(8)).index == 5


@pytest.mark.trio
async def test_seed_slots_are_counted_at_the_pick() -> None:
    """Workers pick before any transfer starts: without counting picks, every worker of a
    member would go to the seed at once (seen: the origin sent each unit ~3 times)."""
    fetcher = _fetcher(promised=set(), preferred=set())
    queue = _jobs(8)
    assert fetcher._next_job(queue) is not None and fetcher._next_job(queue) is not None
    assert fetcher._next_job(queue) is None  # seed_parallel = 2


@pytest.mark.trio
async def test_another_members_share_is_left_to_it_for_a_grace() -> None:
    fetcher = _fetcher(promised=set(), preferred={5})
    fetcher._started = trio.current_time()  # a fetch that has just begun
    queue = _jobs(8)
    assert fetcher._next_job(queue).index == 5
    assert fetcher._next_job(queue) is None  # the rest is other members' share, for now
    fetcher._started -= fetcher.swarm.share_grace
    assert fetcher._next_job(queue) is not None


@pytest.mark.trio
async def test_a_unit_out_of_view_is_taken_from_a_seed_only_once_units_stop_landing() -> None:
    """Past the grace, in a swarm, a unit that no watched peer holds or promised and that is
    not this member's share is left off the seed while units land here (from peers, or its
    own share), and taken once none has for `seed_quiet` s. Another unit from the seed does
    not count as landing, or each one would hold the next off the seed."""
    fetcher = _fetcher(promised=set(), preferred={5}, members=32)
    fetcher._started = fetcher._landed = trio.current_time() - fetcher.swarm.share_grace
    queue = _jobs(8)
    assert fetcher._next_job(queue).index == 5  # its own share: never held back
    fetcher._ended(_jobs(8)[5], won=True)  # ... and it landed
    assert fetcher._next_job(queue) is None
    fetcher._landed -= fetcher.swarm.seed_quiet  # nothing landed since
    taken = fetcher._next_job(queue)
    assert taken is not None
    fetcher._ended(taken, won=True)  # from the seed, not its share: still quiet
    again = fetcher._next_job(queue)
    assert again is not None
    fetcher._ended(again, won=True)  # the seed slot is free again
    peer_unit = queue.popleft()  # a unit a peer served (never picked for the seeds) lands
    fetcher._ended(peer_unit, won=True)
    assert fetcher._next_job(queue) is None  # units land again: the rest waits
    alone = _fetcher(promised=set(), preferred=set(range(8)))  # alone: all its share
    alone._started = alone._landed = trio.current_time()
    assert alone._next_job(_jobs(8)) is not None


@pytest.mark.trio
async def test_a_unit_finished_after_its_version_was_pruned_is_no_error(
    tmp_path: Path, identity: Identity
) -> None:
    m, sv = await _unheld_version(tmp_path, identity, tmp_path / "gone")  # folder never made
    sv.drop()  # as Store.prune does before removing the folder
    for p in m.payload:
        for i in range(len(p.pieces) or 1):
            sv.mark(p.name, i)
    assert sv.complete and not (tmp_path / "gone").exists()
