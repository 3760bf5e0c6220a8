"""The node's seeder: every node re-serves the weights it holds, unless told not to.

It is a SHARDCAST swarm member (`shardcast.relay.Relay` with the node's identity): it
mirrors each version from the pool's weight sources and from its peers, rarest shard first,
serves every verified shard at once, and signs its own address into gossiped announcements
so other nodes, late joiners included, find it. The node's own client fetches through it,
so each shard crosses the network once. `--no-reseed` opts out; `--upload-cap MB/s` caps
what it uploads.
"""

from __future__ import annotations

from pathlib import Path

from protocol.identity import Identity
from shardcast.relay import Relay


def make_seeder(
    upstreams: list[str],
    root: Path,
    *,
    identity: Identity,
    public_key: bytes,
    pool_id: str,
    keep: int,
    upload_cap_mb: float | None,
) -> Relay:
    return Relay(
        upstreams,
        root,
        public_key=public_key,
        pool_id=pool_id,
        keep=keep,
        rate=upload_cap_mb * 1e6 if upload_cap_mb else None,
        identity=identity,
    )
