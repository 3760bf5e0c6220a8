"""Two tasks of one client fetching the same version at once (a node's follower and its work
loop) both get it, built once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio
from sc_helpers import POOL_ID, SHARD, make_checkpoint, nudge_checkpoint, same_tree

from protocol.identity import Identity
from shardcast.client import Client
from shardcast.origin import Origin


@pytest.mark.trio
async def test_concurrent_fetches_of_one_delta_version_both_succeed(
    tmp_path: Path, identity: Identity
) -> None:
    origin = Origin(tmp_path / "o", identity, POOL_ID, shard_size=SHARD)
    ck = make_checkpoint(tmp_path / "ck", mb=0.5)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(origin.serve)
        await origin.publish(ck, 0)
        ck1 = tmp_path / "ck1"
        shutil.copytree(ck, ck1)
        nudge_checkpoint(ck1, seed=1)
        assert (await origin.publish(ck1, 1, delta=True)).is_delta
        c = Client([url], tmp_path / "c", public_key=identity.public_key, pool_id=POOL_ID)
        results = []

        async def fetch() -> None:
            results.append(await c.fetch(1))

        async with trio.open_nursery() as both:
            both.start_soon(fetch)
            both.start_soon(fetch)
        assert [r.version for r in results] == [1, 1]
        assert same_tree(c.path_of(1), ck1)
        assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")) == []
        assert c._fetching == {}  # no lock left behind
        await c.aclose()
        nursery.cancel_scope.cancel()
