"""The node's seeder: every node re-serves the weights it holds, unless told not to.

It is a SHARDCAST swarm member (`shardcast.relay.Relay` with the node's identity): it
mirrors each version from the pool's weight sources and from its peers, rarest shard first,
serves every verified shard at once, and signs its own address into gossiped announcements
so other nodes, late joiners included, find it. The node's own client fetches through it,
so each shard crosses the network once. `--no-reseed` opts out; `--upload-cap MB/s` caps
what it uploads.

Behind NAT nobody can dial the seeder's HTTP port; `seed_behind_nat` serves it over the
node's libp2p host instead, through the coordinator's relay hop when the dial-back check
says the node is not reachable, and the node advertises `p2p://peer/<its id>`
(docs/shardcast.md, "NAT traversal").
"""

from __future__ import annotations

import enum
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from protocol.identity import Identity
from shardcast.nat import P2PNode, Reachability, attach_node, peer_of, reserve_on
from shardcast.p2p import p2p_url
from shardcast.relay import Relay
from shardcast.swarm import OwnUrls

log = logging.getLogger("swarmrl.node")


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
    own: OwnUrls | None = None,
) -> Relay:
    """The node's seeder. `own` holds every URL the node is reached at (shared with each
    seeder it starts): none of them is ever taken for a peer."""
    return Relay(
        upstreams,
        root,
        public_key=public_key,
        pool_id=pool_id,
        keep=keep,
        rate=upload_cap_mb * 1e6 if upload_cap_mb else None,
        identity=identity,
        mounts=mounts,
        own=own,
    )


RESTART_S = 1.0
"""The first wait before a failed seeder is started again; it doubles up to `MAX_RESTART_S`."""
MAX_RESTART_S = 30.0
RECHECK_S = 60.0
"""How long a node whose dial-back check gave no verdict waits before asking again."""
RECHECKS = 10


async def keep_seeding(
    make: Callable[[], Relay],
    host: str,
    port: int,
    *,
    restart_s: float = RESTART_S,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the seeder `make()` builds, and a fresh one on the same port whenever it stops
    with an error, until cancelled. `task_status` gets the first one's URL.

    Re-serving is a service to the pool; the node's own work goes on without it, but its
    client fetches through it. A seeder error (a prune racing a mirror once) used to end the
    whole node. A new seeder reloads the verified versions on disk and keeps the URL the node
    advertised, so the coordinator's checks and the node's client find it again. One that
    cannot start the first time is a configuration error (a taken port): that is raised."""
    started = False
    wait = restart_s
    while True:
        try:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(make().run, host, port)
                if not started:
                    task_status.started(url)
                    started = True
                    port = port or urlsplit(url).port or 0
            log.warning("the seeder stopped; starting it again in %.0f s", wait)
        except Exception:
            if not started:
                raise
            log.warning("the seeder failed; starting it again in %.0f s", wait, exc_info=True)
        await trio.sleep(wait)
        wait = min(2 * wait, MAX_RESTART_S)


SLOT_RENEW_S = 30.0
"""How often a node served over libp2p asks its hops for its slot again."""


async def keep_slots(
    node: P2PNode, hops: Callable[[], Sequence[str]], every_s: float = SLOT_RENEW_S
) -> None:
    """Ask the relay hops `hops()` names (the coordinator's addresses, which move when it is
    rediscovered) for this node's slot every `every_s`, until cancelled.

    A coordinator that restarts forgets every slot, and py-libp2p asks again only shortly
    before a reservation lapses (up to 15 minutes later): until then nobody could reach this
    node and the coordinator's check said `no_slot`. A slot the hop still holds is only
    renewed. The hop's cost: one small request per node per `every_s`, from admitted nodes
    only."""
    while True:
        await trio.sleep(every_s)
        await reserve_on(node, hops())


async def settle_reachability(
    node: P2PNode,
    hops: Callable[[], Sequence[str]],
    every_s: float = RECHECK_S,
    tries: int = RECHECKS,
) -> Reachability:
    """After a dial-back check that gave no verdict (the hop busy or restarting, a lost
    answer), ask again every `every_s`, at most `tries` times, the first hop `hops()` names
    then: its first verdict, or UNKNOWN after them all. Without it a node left on HTTP by one
    failed check stayed there, unreachable behind NAT, for its whole life."""
    for _ in range(tries):
        await trio.sleep(every_s)
        current = hops()
        if current and (reach := await node.reachability(current[0])) is not Reachability.UNKNOWN:
            return reach
    return Reachability.UNKNOWN


class NatMode(enum.StrEnum):
    """`node join --nat`: whether the seeder is served over libp2p (docs/shardcast.md)."""

    AUTO = "auto"
    """Ask the coordinator's AutoNAT server for a dial-back: over libp2p only when it says
    this node cannot be dialled (no verdict, e.g. a coordinator without a hop: HTTP)."""
    ON = "on"
    OFF = "off"


@asynccontextmanager
async def seed_behind_nat(
    libp2p_host: Any, peers: Sequence[str] = (), hops: Sequence[str] = ()
) -> AsyncIterator[P2PNode]:
    """Circuit relay on the node's libp2p host (`Host.libp2p`), for the block's life.

    Give `shardcast.nat.p2p_mounts(node)` to `make_seeder(mounts=...)` (and to the node's
    client) so they can fetch from `p2p://peer/<id>` sources: at the `peers` multiaddrs, or
    else through the relay `hops` (a pool's coordinator). Once the seeder serves at `url`,
    `p2p_relay_url(node, url, hops, mode)` says what to advertise."""
    async with attach_node(libp2p_host) as node:
        for addr in peers:
            node.learn(peer_of(addr), [addr])
        node.use_hops(hops)
        yield node


async def p2p_relay_url(
    node: P2PNode, seeder_url: str, hops: Sequence[str], mode: NatMode
) -> str | None:
    """`p2p_url(node.peer_id)` once the seeder at `seeder_url` is served over `node`'s
    streams and a hop gave this node a slot; None when HTTP is to be advertised (mode off,
    no hop, a public verdict in mode auto, or no hop gave a slot)."""
    if mode is NatMode.OFF or not hops:
        return None
    if mode is NatMode.AUTO:
        reach = await node.reachability(hops[0])
        log.info("dial-back check via the coordinator: %s", reach.value)
        if reach is not Reachability.PRIVATE:
            return None
    circuits = await reserve_on(node, hops)
    if not circuits:
        log.warning("no relay hop gave this node a slot; advertising HTTP only")
        return None
    node.serve_gateway(seeder_url)
    log.info("serving weights over libp2p, reached at %s", ", ".join(circuits))
    return p2p_url(node.peer_id)


async def move_behind_hop(
    node: P2PNode,
    seeder_url: str,
    hops: Callable[[], Sequence[str]],
    told_unreachable: trio.Event,
    every_s: float = RECHECK_S,
    tries: int = RECHECKS,
) -> str | None:
    """For a node serving its seeder over HTTP in `--nat auto`: wait until one of two
    witnesses says nobody can reach it, then serve over libp2p through a hop (the URL to
    advertise, as `p2p_relay_url`; None when no hop gave a slot).

    The witnesses: a dial-back verdict of private, asked again while the checks give none
    (`settle_reachability`), and the coordinator's own checks of the advertised URL
    (`told_unreachable`, set from heartbeat replies). The second is the firmer: py-libp2p's
    AutoNAT server may answer "public" over the connection the node already holds, and a
    node's reachability can change after its one check at start."""
    async with trio.open_nursery() as nursery:

        async def dial_back_again() -> None:
            if node.verdict is not Reachability.UNKNOWN:
                return
            if await settle_reachability(node, hops, every_s, tries) is Reachability.PRIVATE:
                told_unreachable.set()

        nursery.start_soon(dial_back_again)
        await told_unreachable.wait()
        nursery.cancel_scope.cancel()
    log.info("nobody can reach this node's seeder over HTTP; moving behind the relay hop")
    return await p2p_relay_url(node, seeder_url, hops(), NatMode.ON)
