"""The node's seeder: every node re-serves the weights it holds, unless told not to.

It is a SHARDCAST swarm member (`shardcast.relay.Relay` with the node's identity): it
mirrors each version from the pool's weight sources and from its peers, rarest shard first,
serves every verified shard at once, and signs its own address into gossiped announcements
so other nodes, late joiners included, find it. The node's own client fetches through it,
so each shard crosses the network once. `--no-reseed` opts out; `--upload-cap MB/s` caps
what it uploads.

Behind NAT nobody can dial the seeder's HTTP port; `seed_behind_nat` serves it over the
node's libp2p host instead, through a relay hop when the dial-back check says the node is
not reachable (docs/shardcast.md, "NAT traversal").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from protocol.identity import Identity
from shardcast.nat import P2PNode, attach_node, peer_of
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
    mounts: dict[str, httpx.AsyncBaseTransport] | None = None,
) -> Relay:
    return Relay(
        upstreams,
        root,
        public_key=public_key,
        pool_id=pool_id,
        keep=keep,
        rate=upload_cap_mb * 1e6 if upload_cap_mb else None,
        identity=identity,
        mounts=mounts,
    )


@asynccontextmanager
async def seed_behind_nat(libp2p_host: Any, peers: Sequence[str] = ()) -> AsyncIterator[P2PNode]:
    """Circuit relay on the node's libp2p host (`Host.libp2p`), for the block's life.

    Give `shardcast.nat.p2p_mounts(node)` to `make_seeder(mounts=...)` so the seeder can mirror from
    `p2p://peer/<id>` sources (at the `peers` multiaddrs); once the seeder serves at `url`,
    `await node.serve_member(url, relays)` answers SHARDCAST streams from it and returns the
    addresses to advertise (direct if the dial-back check via the first relay reached it,
    else one /p2p-circuit address per relay that gave it a slot)."""
    async with attach_node(libp2p_host) as node:
        for addr in peers:
            node.learn(peer_of(addr), [addr])
        yield node
