"""A relay gives a version up when it cannot mirror it, and tries again while it is listed;
a client asks a source again for a version it lacked a moment ago."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from sc_helpers import POOL_ID, SHARD, make_checkpoint, same_tree

from protocol.identity import Identity
from shardcast import relay as relay_module
from shardcast import sources as sources_module
from shardcast.client import Client
from shardcast.errors import FetchError, first_error
from shardcast.fetcher import FetchPolicy, VersionGone
from shardcast.origin import Origin
from shardcast.relay import Relay

POLICY = FetchPolicy(parallel=4, max_attempts=4, backoff=0.01, read_timeout=5.0)


@pytest.mark.trio
async def test_a_version_given_up_on_is_mirrored_once_it_can_be(
    tmp_path: Path, identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node reads weights through its own relay only: a version that relay gave up on
    (its upstream was restarting) must come back, or the node waits for weights forever."""
    monkeypatch.setattr(relay_module, "RETRY_ABANDONED_S", 0.5)
    origin = Origin(tmp_path / "o", identity, POOL_ID, shard_size=SHARD)
    ck = make_checkpoint(tmp_path / "ck", mb=0.2)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(origin.serve)
        await origin.publish(ck, 1)
        relay = Relay(
            [url],
            tmp_path / "r",
            public_key=identity.public_key,
            pool_id=POOL_ID,
            poll_wait=1,
            policy=replace(POLICY, deadline=1e-4),  # every mirror runs out of time
        )
        await nursery.start(relay.run)
        with trio.fail_after(20):
            while 1 not in relay.abandoned:
                await trio.sleep(0.05)
        assert relay.store.get(1) is None
        relay.policy = POLICY  # the upstream can be mirrored again
        with trio.fail_after(20):
            while not (relay.store.get(1) and relay.store.get(1).complete):
                await trio.sleep(0.05)
        assert 1 not in relay.abandoned
        assert same_tree(relay.store.get(1).folder / "payload", ck)
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_source_that_lacked_a_version_is_asked_again_later(
    tmp_path: Path, identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's only source is its own relay, which answers 404 while its upstream is down
    (a coordinator restart); that 404 once barred the source for the version for the life
    of the client, and the node never fetched that version again (a CI failure)."""
    monkeypatch.setattr(sources_module, "NOT_YET_RECHECK_S", 0.3)  # v1: above all it listed
    origin = Origin(tmp_path / "o", identity, POOL_ID, shard_size=SHARD)
    ck = make_checkpoint(tmp_path / "ck", mb=0.2)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(origin.serve)
        await origin.publish(ck, 0)
        c = Client(
            [url], tmp_path / "c", public_key=identity.public_key, pool_id=POOL_ID, policy=POLICY
        )
        with pytest.raises(FetchError):
            await c.fetch(1)  # not published yet: 404
        assert c.picker.all_lack(1)
        await origin.publish(make_checkpoint(tmp_path / "ck1", seed=1, mb=0.2), 1)
        with pytest.raises(FetchError):
            await c.fetch(1)  # still barred: a 404 is not re-asked at once
        await trio.sleep(0.35)
        assert not c.picker.all_lack(1)
        r = await c.fetch(1)
        assert r.version == 1 and same_tree(r.path, tmp_path / "ck1")
        await c.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_version_a_source_lists_after_lacking_it_is_fetched_at_once(
    tmp_path: Path, identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node asks its relay for a version the moment it is announced, and the relay, still
    mirroring it, answers 404. Once the relay lists it, the fetch must go through: the "not
    yet" mark outlived the listing, the fetch found no source it could ask and failed, and the
    node tried again a second later (a warning each time, every version, in every pool)."""
    monkeypatch.setattr(sources_module, "NOT_YET_RECHECK_S", 60.0)  # only a listing clears it
    origin = Origin(tmp_path / "o", identity, POOL_ID, shard_size=SHARD)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(origin.serve)
        await origin.publish(make_checkpoint(tmp_path / "ck", mb=0.2), 0)
        c = Client(
            [url], tmp_path / "c", public_key=identity.public_key, pool_id=POOL_ID, policy=POLICY
        )
        assert (await c.fetch(0)).version == 0
        with pytest.raises(VersionGone):
            await c.fetch(1)  # announced, not served yet
        await origin.publish(make_checkpoint(tmp_path / "ck1", seed=1, mb=0.2), 1)
        with trio.fail_after(10):
            assert await c.wait_for_newer(0, timeout=10) == 1
            r = await c.fetch(1)
        assert r.version == 1 and same_tree(r.path, tmp_path / "ck1")
        await c.aclose()
        nursery.cancel_scope.cancel()


def test_a_listing_clears_a_not_yet_mark_unless_its_source_is_muted() -> None:
    """A source that lists a version it lacked a moment ago is asked for it again at once;
    one muted for listing a version it then denied (a lie) clears nothing by listing again."""
    picker = sources_module.SourcePicker(["http://a", "http://b"])
    a, b = picker.stats["http://a"], picker.stats["http://b"]
    picker.note_listing("http://a", [1, 2])
    picker.note_listing("http://b", [1, 2, 3])
    picker.record_missing(a, 3)  # not yet
    picker.record_missing(b, 3)  # a lie: b is muted
    now = time.monotonic()
    assert a.lacks(3, now) and b.lacks(3, now)
    picker.note_listing("http://a", [1, 2, 3])
    picker.note_listing("http://b", [1, 2, 3])
    now = time.monotonic()
    assert not a.lacks(3, now) and b.lacks(3, now)
    assert picker.pick(3) is a


def test_a_404_for_a_version_above_the_listing_is_rechecked_sooner_than_one_it_listed() -> None:
    """ "Not yet" (newer than anything the source listed: its relay is mirroring it) is asked
    again after `NOT_YET_RECHECK_S`; a version it listed or has passed waits
    `MISSING_RECHECK_S`, and a listed one is also a lie."""
    picker = sources_module.SourcePicker(["http://a", "http://b"])
    a, b = picker.stats["http://a"], picker.stats["http://b"]
    a.note_listing([1, 2])
    b.note_listing([1, 2, 3])
    before = time.monotonic()
    picker.record_missing(a, 3)  # above its listing: not yet
    picker.record_missing(b, 3)  # listed, then denied: a lie
    picker.record_missing(a, 0)  # below its newest: no longer
    after = time.monotonic()
    not_yet, lied, gone = a.missing[3] - before, b.missing[3] - before, a.missing[0] - before
    assert not_yet <= sources_module.NOT_YET_RECHECK_S + (after - before)
    assert lied >= sources_module.MISSING_RECHECK_S and gone >= sources_module.MISSING_RECHECK_S
    assert not a.lacks(3, before + sources_module.NOT_YET_RECHECK_S + 0.01 + (after - before))
    assert b.lacks(3, before + sources_module.NOT_YET_RECHECK_S + 0.01)
    assert (a.lies, b.lies) == (0, 1)


def test_a_swarm_peer_lacking_a_version_is_still_watched_but_not_one_at_fault() -> None:
    """`dropped` (which peers a member stops watching): a 404 is "not yet" for a peer, not a
    reason to stop asking its bitfield; bad bytes past the ban and a stalled transfer are."""
    picker = sources_module.SourcePicker(["http://a", "http://b", "http://c"])
    a, b, c = (picker.stats[u] for u in ("http://a", "http://b", "http://c"))
    picker.record_missing(a, 3)
    assert a.lacks(3, time.monotonic()) and not picker.dropped("http://a", 3)
    for _ in range(picker.ban_after):
        picker.record_corrupt(b)
    assert picker.dropped("http://b", 3) and picker.dropped("http://b", 4)
    picker.record_too_slow(c, 3, 1000, 10.0)
    assert picker.dropped("http://c", 3) and not picker.dropped("http://c", 4)
    assert picker.dropped("http://unknown", 3)


async def _cancelled_while_a_write_fails() -> BaseExceptionGroup:
    """What a mirror's nursery raises when a prune cancels it (`scope.cancel()`) just as a
    unit's write into the removed folder fails: the write's error beside the cancellation."""

    async def write_into_removed_folder() -> None:
        await trio.sleep(0.01)
        scope.cancel()  # the prune
        raise FetchError("cannot write v0/payload/config.json: No such file or directory")

    with trio.CancelScope() as scope:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                nursery.start_soon(write_into_removed_folder)
        except BaseExceptionGroup as group:
            return group
    raise AssertionError("the nursery raised nothing")


@pytest.mark.trio
async def test_a_failed_write_of_a_cancelled_mirror_is_a_plain_error() -> None:
    group = await _cancelled_while_a_write_fails()
    assert any(isinstance(e, trio.Cancelled) for e in group.exceptions)
    # unwrapped, the relay gives the version up instead of ending the node it runs in
    assert isinstance(first_error(group, cancelled=True), FetchError)
    # a cancellation the caller did not ask for is never hidden
    assert first_error(group) is group
