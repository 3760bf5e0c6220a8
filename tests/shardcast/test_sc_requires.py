"""Versions a version requires (a LoRA pool's base) stay fetchable however many versions
follow: the origin and relays retain them, a late joiner's fetch brings them along, and a
client's prune keeps them. The requirement list is signed and bounded."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio
from sc_helpers import POOL_ID, SHARD, make_checkpoint, same_tree

from protocol.identity import Identity
from shardcast.client import Client
from shardcast.errors import ManifestError, ShardcastError
from shardcast.fetcher import FetchPolicy
from shardcast.manifest import DOMAIN, MAX_REQUIRES, REQUIRES_FILE, Manifest, open_manifest
from shardcast.origin import Origin
from shardcast.relay import Relay
from shardcast.signed import Envelope, seal

POLICY = FetchPolicy(parallel=4, max_attempts=4, backoff=0.01, read_timeout=5.0)
KEEP = 2
ADAPTERS = range(1, 6)


def adapter_folder(tmp_path: Path, version: int) -> Path:
    folder = tmp_path / f"ck{version}"
    folder.mkdir()
    (folder / "adapter.bin").write_bytes(bytes([version]) * 3000)
    return folder


async def publish_base_and_adapters(tmp_path: Path, identity: Identity) -> tuple[Origin, Path]:
    """An origin with v0 a full folder and v1..v5 folders that require it (as a LoRA pool
    publishes), every version full (`full_every=1`) so that no delta chain keeps the base:
    only `requires` can; and the base folder."""
    origin = Origin(tmp_path / "o", identity, POOL_ID, keep=KEEP, shard_size=SHARD, full_every=1)
    base = make_checkpoint(tmp_path / "ck0", mb=0.2)
    await origin.publish(base, 0)
    for v in ADAPTERS:
        await origin.publish(adapter_folder(tmp_path, v), v, requires=[0])
    return origin, base


@asynccontextmanager
async def serving(
    tmp_path: Path, identity: Identity
) -> AsyncIterator[tuple[Origin, str, Path, trio.Nursery]]:
    """`publish_base_and_adapters`, served: the origin, its URL, the base folder, and the
    nursery it serves in."""
    async with trio.open_nursery() as nursery:
        origin, base = await publish_base_and_adapters(tmp_path, identity)
        url = await nursery.start(origin.serve)
        yield origin, url, base, nursery
        nursery.cancel_scope.cancel()


def client(url: str, dest: Path, identity: Identity) -> Client:
    return Client(
        [url], dest, public_key=identity.public_key, pool_id=POOL_ID, keep=KEEP, policy=POLICY
    )


@pytest.mark.trio
async def test_a_late_joiner_gets_the_base_after_more_than_keep_versions(
    tmp_path: Path, identity: Identity
) -> None:
    async with serving(tmp_path, identity) as (origin, url, base, _):
        assert set(origin.store.versions) == {0, 4, 5}  # the base, required by both kept

        late = client(url, tmp_path / "late", identity)
        result = await late.fetch("latest")
        assert result.version == 5
        assert late.local_versions() == [0, 5]
        assert same_tree(late.path_of(0), base)

        # Newer versions come and the client prunes to `keep`: the base stays.
        for v in (6, 7):
            await origin.publish(adapter_folder(tmp_path, v), v, requires=[0])
            await late.fetch("latest")
        assert late.local_versions() == [0, 6, 7]
        assert await late.prune() == []
        await late.aclose()

        # Once no kept version requires it, the base goes like any old version.
        for v in (8, 9):
            await origin.publish(make_checkpoint(tmp_path / f"ck{v}", seed=v, mb=0.2), v)
        assert set(origin.store.versions) == {8, 9}


@pytest.mark.trio
async def test_a_held_version_whose_base_was_pruned_fetches_the_base_again(
    tmp_path: Path, identity: Identity
) -> None:
    async with serving(tmp_path, identity) as (_, url, _, _):
        c = client(url, tmp_path / "c", identity)
        await c.fetch(5)
        await trio.to_thread.run_sync(shutil.rmtree, c.path_of(0))
        await c.fetch(5)
        assert c.local_versions() == [0, 5]
        await c.aclose()


@pytest.mark.trio
async def test_a_relay_mirrors_and_keeps_the_required_base(
    tmp_path: Path, identity: Identity
) -> None:
    async with serving(tmp_path, identity) as (origin, url, base, nursery):
        relay = Relay(
            [url],
            tmp_path / "r",
            public_key=identity.public_key,
            pool_id=POOL_ID,
            keep=KEEP,
            poll_wait=30,  # the base must come from v5's manifest, not from the next poll
            policy=POLICY,
        )
        relay_url = await nursery.start(relay.run)

        async def until_held(versions: set[int]) -> None:
            with trio.fail_after(20):
                while {v for v, sv in relay.store.versions.items() if sv.complete} != versions:
                    await trio.sleep(0.05)

        await until_held({0, 4, 5})
        assert same_tree(relay.store.get(0).folder / "payload", base)

        # A node that reads through the relay alone gets the base there.
        late = client(relay_url, tmp_path / "late", identity)
        assert (await late.fetch("latest")).version == 5
        assert late.local_versions() == [0, 5]
        await late.aclose()

        # A newer version that requires it too: the relay prunes v4, not the base.
        await origin.publish(adapter_folder(tmp_path, 6), 6, requires=[0])
        await until_held({0, 5, 6})


def signed_with(manifest: Manifest, identity: Identity, **changes) -> bytes:
    """`manifest` changed and signed by the coordinator's key, bypassing the origin's
    checks (a coordinator bug, or a stolen key used carelessly)."""
    body = msgspec.msgpack.encode(msgspec.structs.replace(manifest, **changes))
    return seal(body, identity, DOMAIN)


@pytest.mark.trio
async def test_forged_or_malformed_requirements_are_refused(
    tmp_path: Path, identity: Identity
) -> None:
    origin, _ = await publish_base_and_adapters(tmp_path, identity)
    sv = origin.store.get(5)
    assert sv is not None and sv.manifest.requires == [0]

    def opened(data: bytes) -> Manifest:
        return open_manifest(data, public_key=identity.public_key, pool_id=POOL_ID)

    # A relay that edits the list breaks the signature.
    env = msgspec.msgpack.decode(sv.manifest_bytes, type=Envelope)
    body = msgspec.msgpack.encode(msgspec.structs.replace(sv.manifest, requires=[0, 1, 2]))
    forged = msgspec.msgpack.encode(msgspec.structs.replace(env, body=body))
    with pytest.raises(ManifestError, match="signature"):
        opened(forged)

    # Signed, but not something a holder can honour.
    # Itself, a later version, one twice, too many, not a version.
    for requires in ([5], [7], [0, 0], list(range(MAX_REQUIRES + 1)), [-1]):
        with pytest.raises(ManifestError):
            opened(signed_with(sv.manifest, identity, requires=requires))

    # The origin refuses to sign them, or one naming a version it no longer holds.
    folder = adapter_folder(tmp_path, 6)
    with pytest.raises(ManifestError):
        await origin.publish(folder, 6, requires=[6])
    with pytest.raises(ShardcastError, match="does not hold"):
        await origin.publish(folder, 6, requires=[1])
    (folder / REQUIRES_FILE).write_text('{"base": 0}')
    with pytest.raises(ManifestError, match="JSON list"):
        await origin.publish(folder, 6)
    (folder / REQUIRES_FILE).write_text("[0]")
    assert (await origin.publish(folder, 6)).requires == [0]  # what the folder declares


def test_a_manifest_without_requirements_encodes_as_before(identity: Identity) -> None:
    """Old receivers refuse unknown fields: a version that requires nothing must not carry
    the field, and a manifest from before it reads as requiring nothing."""
    m = Manifest(pool_id=POOL_ID, version=3, shard_size=SHARD, files=[], payload=[])
    assert b"requires" not in msgspec.msgpack.encode(m)
    data = seal(msgspec.msgpack.encode(m), identity, DOMAIN)
    assert open_manifest(data, public_key=identity.public_key, pool_id=POOL_ID).requires == []
