"""The weights sources the coordinator hands out, and what nodes say about where theirs came from.

A relay URL a node advertises is a claim. It is handed to other nodes only after the
coordinator has checked that it serves the current signed manifest, and it is checked again
every `recheck_s`: one that lies, stalls or trickles drops out of the list. Checks run in the
background with an overall deadline each, and the API reads their cached results, so no page
view ever makes a request to a node-chosen address.

What a node's joins can make the coordinator do is bounded, however often it joins: its
first URL is checked at once, and a new URL waits for its node's next turn, so one node's
relay is checked at most once per `recheck_s` (once per `RECHECK_FAILED_S`, doubling, while
it fails). The directory holds `MAX_NODE_RELAYS`; when it
is full, a newcomer's URL takes the place of the oldest one not verified now, never of one
handed out, so keys that advertise junk cannot lock honest relays out.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from protocol.errors import ProtocolError
from protocol.host import public_key_of_peer
from protocol.identity import peer_id_of
from protocol.messages import RelayCheck
from shardcast.nat import HopLimits, P2PNode, attach_node
from shardcast.p2p import SCHEME, URL_PREFIX, P2PTransport, peer_of_source
from shardcast.scope import plain_ip
from trainer.view import RelayStatus

log = logging.getLogger("swarmrl.relays")


@dataclass(frozen=True)
class Checked:
    """What one check of a relay found."""

    error: str | None
    """None when it passed, else a reason code."""
    version: int | None = None
    """The version whose signed manifest (and a shard) it served."""
    served: int | None = None
    """Bytes it says it served (its `/stats`: its own word, shown, never relied on)."""


Probe = Callable[[str, int], Awaitable[Checked]]
"""probe(url, version): whether `url` serves the signed manifest of `version` (or the one
before)."""

MAX_NODE_RELAYS = 256
RECHECK_FAILED_S = 5.0
"""After a failed check, the next comes this long after, doubling up to `recheck_s`: a relay
checked before its seeder was ready would otherwise wait a whole `recheck_s` to be handed
out (joins no longer start rounds)."""
MAX_SOURCE_REPORTS = 1024
"""Nodes whose latest report of where their weights came from is kept (the most recent
reporters): shown on the dashboard, and bounded however many keys ever joined."""
NOT_OWN_ADDRESS = "not_own_address"
"""An http(s) relay URL that names another address than its node connects from: never probed."""
NO_SLOT = "no_slot"
"""A stream source whose node holds no slot on the coordinator's hop: unreachable to others."""
MAX_URLS_HANDED_OUT = 32
UNREACHABLE_FOR_S = 60.0
"""How long every check of a node's relay must have found nobody answering (two checks at
least) before the node is told so: a seeder restarting, or a check racing a join, is not a
reason to move behind the hop."""
UNREACHABLE = frozenset({"unreachable", "timeout"})
"""Probe results (`shardcast.probe.ProbeStatus`) that mean nobody answered at the URL."""


@dataclass
class _Relay:
    url: str
    node: bytes | None
    verified: bool = False
    checked_at: float = 0.0
    error: str | None = "not checked yet"
    version: int | None = None
    served: int | None = None
    unreachable_since: float | None = None
    """When the current run of checks that found nobody answering began."""
    unreachable_checks: int = 0
    due_at: float = 0.0
    """When (`time.time()`) its next check is due."""
    failed_checks: int = 0
    """Checks in a row it failed: a failing relay is checked again sooner (`RECHECK_FAILED_S`)."""
    added_at: float = 0.0


def acceptable_url(url: str) -> bool:
    """`http(s)://host[:port]` of bounded length (no path, query, fragment or user), or a bare
    `p2p://peer/<peer id>`: the only shapes we will probe. A path, a query or a fragment would
    let a node choose what the probe asks some other server for (a GET of its choosing,
    `http://internal/admin?x=` + the probe's path)."""
    if len(url) > 256:
        return False
    if url.startswith(URL_PREFIX):
        return stream_peer(url) is not None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number in range)
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and not parts.username
        and parts.path in ("", "/")
        and not parts.query
        and not parts.fragment
        and "?" not in url
        and "#" not in url
    )


def at_own_address(url: str, seen_at: str) -> bool:
    """Whether the http(s) relay `url` names, as an IP address, the one its node connects to
    us from (`seen_at`). Else our probe would go wherever the node says: to our own loopback
    (the origin's port would pass the check, and be handed out), our private network (a port
    scan read off the relay's status), or any third party. A name is refused too: it can
    resolve to one address when checked and another when fetched."""
    try:
        named = plain_ip(urlsplit(url).hostname or "")
        return named == plain_ip(seen_at)
    except ValueError:
        return False


def stream_peer(url: str) -> str | None:
    """The peer id of a bare `p2p://peer/<id>` URL; None for anything else."""
    try:
        return peer_of_source(url)
    except ProtocolError:
        return None


def own_url(node: bytes, url: str) -> bool:
    """Whether `node` may advertise `url`: any http(s) URL (the probe decides whether it
    serves), but a stream source only under its own peer id. The coordinator reaches a
    stream source over the node's own connection, and hands it out as this node's: another
    peer's id would send fetchers to someone who never offered to serve them."""
    peer = stream_peer(url)
    return peer is None or peer == peer_id_of(node)


class RelayDirectory:
    def __init__(self, spec_relays: list[str], probe: Probe, recheck_s: float = 30.0) -> None:
        # Relays named in the pool spec are the operator's: handed out as they are.
        self._spec = list(spec_relays)
        self._probe = probe
        self.recheck_s = recheck_s
        self._relays: dict[bytes, _Relay] = {}
        self._sources: OrderedDict[bytes, dict[str, int]] = OrderedDict()
        self._changed = trio.Event()

    def advertise(self, node: bytes, url: str, seen_at: str | None = None) -> bool:
        """`node` says it relays at `url` (checked before anyone is sent there). `seen_at`:
        the address its connection comes from ("" when it has none left); an http(s) URL must
        name exactly that one, or it is kept as `NOT_OWN_ADDRESS`, never probed nor handed out
        (None: no transport to say, as in a test driving the handlers)."""
        if not acceptable_url(url) or not own_url(node, url):
            return False
        now = time.time()
        known = self._relays.get(node)
        if known is not None and known.url == url:
            # a join says it serves now: what earlier checks found there starts over
            known.unreachable_since, known.unreachable_checks = None, 0
            return True
        if known is None and not self._make_room():
            return False
        # A new URL waits for its node's turn: joining again with another cannot buy a check.
        due = now if known is None else max(known.due_at, known.added_at + self.recheck_s)
        relay = _Relay(url, node, due_at=due, added_at=now)
        if seen_at is not None and stream_peer(url) is None and not at_own_address(url, seen_at):
            relay.error, relay.checked_at = NOT_OWN_ADDRESS, now
        elif relay.due_at <= now:
            self._changed.set()
        self._relays[node] = relay
        return True

    def _make_room(self) -> bool:
        """Room for one more node's relay: when full, the oldest of those not handed out
        (not verified now) goes; False when every one is verified."""
        if len(self._relays) < MAX_NODE_RELAYS:
            return True
        unproven = [r for r in self._relays.values() if not r.verified]
        if not unproven:
            return False
        oldest = min(unproven, key=lambda r: r.added_at)
        del self._relays[oldest.node]
        return True

    def forget(self, node: bytes) -> None:
        """A banned node: its relay and its reports go."""
        self._relays.pop(node, None)
        self._sources.pop(node, None)

    def note_sources(self, node: bytes, fetched: dict[str, int]) -> None:
        """Bytes `node` says it fetched from each URL (its latest heartbeat; shown only)."""
        self._sources[node] = dict(fetched)
        self._sources.move_to_end(node)
        while len(self._sources) > MAX_SOURCE_REPORTS:
            self._sources.popitem(last=False)

    def check_of(self, node: bytes, now: float) -> RelayCheck:
        """What the checks found at the relay `node` advertised, for its heartbeat reply."""
        relay = self._relays.get(node)
        if relay is None or relay.checked_at == 0.0:
            return "none"
        if relay.verified:
            return "ok"
        if relay.error == NOT_OWN_ADDRESS:
            return "refused"
        since = relay.unreachable_since
        if since is not None and relay.unreachable_checks >= 2 and now - since >= UNREACHABLE_FOR_S:
            return "unreachable"
        return "failed"

    def sources(self, node: bytes) -> dict[str, int]:
        return dict(self._sources.get(node, {}))

    def weights_urls(self, origin_url: str | None) -> list[str]:
        """The origin, the operator's relays, then verified node relays; past
        `MAX_URLS_HANDED_OUT`, a random sample of those, so the first to pass their checks
        (keys that run working relays early, say) do not hold every place for good."""
        urls = [origin_url] if origin_url else []
        urls += self._spec
        verified = [r.url for r in self._relays.values() if r.verified]
        room = max(0, MAX_URLS_HANDED_OUT - len(urls))
        urls += verified if len(verified) <= room else random.sample(verified, room)
        return urls[:MAX_URLS_HANDED_OUT]

    def statuses(self) -> list[RelayStatus]:
        out = [RelayStatus(url, None, True, 0.0) for url in self._spec]
        out += [
            RelayStatus(
                r.url,
                r.node.hex() if r.node else None,
                r.verified,
                r.checked_at,
                r.error,
                [] if r.version is None else [r.version],
                r.served,
            )
            for r in self._relays.values()
        ]
        return out

    async def check_forever(
        self, version: Callable[[], int], checked: Callable[[list[str]], object]
    ) -> None:
        """Check each advertised relay when it is due (a node's first at once, then every
        `recheck_s`); after each round, `checked(the verified relays' URLs)`."""
        while True:
            await self._check_these(self._due(time.time()), version())
            checked(self.weights_urls(None))
            self._changed = trio.Event()
            with trio.move_on_after(self._until_due(time.time())):
                await self._changed.wait()

    async def check_all(self, version: int) -> None:
        """Check every relay that may be probed now, due or not."""
        await self._check_these(self._due(math.inf), version)

    def _due(self, now: float) -> list[_Relay]:
        return [r for r in self._relays.values() if r.error != NOT_OWN_ADDRESS and r.due_at <= now]

    def _until_due(self, now: float) -> float:
        """Seconds until the next check falls due, at most `recheck_s`."""
        due = [r.due_at for r in self._relays.values() if r.error != NOT_OWN_ADDRESS]
        return min([self.recheck_s, *(max(0.0, t - now) for t in due)])

    def _recheck_after(self, failed: int) -> float:
        """Seconds to a relay's next check after `failed` failed checks in a row."""
        if not failed:
            return self.recheck_s
        return min(self.recheck_s, RECHECK_FAILED_S * 2 ** (failed - 1))

    async def _check_these(self, relays: list[_Relay], version: int) -> None:
        async with trio.open_nursery() as nursery:
            for relay in relays:
                nursery.start_soon(self._check, relay, version)

    async def _check(self, relay: _Relay, version: int) -> None:
        found = await self._probe(relay.url, version)
        if relay.verified and found.error is not None:
            log.warning("relay %s dropped: %s", relay.url, found.error)
        now = time.time()
        relay.verified, relay.error, relay.checked_at = found.error is None, found.error, now
        relay.failed_checks = 0 if found.error is None else relay.failed_checks + 1
        relay.due_at = now + self._recheck_after(relay.failed_checks)
        relay.version, relay.served = found.version, found.served
        if found.error in UNREACHABLE:
            relay.unreachable_since = relay.unreachable_since or now
            relay.unreachable_checks += 1
        else:
            relay.unreachable_since, relay.unreachable_checks = None, 0


async def check_relay(
    url: str,
    version: int,
    *,
    public_key: bytes,
    pool_id: str,
    http: httpx.AsyncClient,
    hop: P2PNode | None,
    timeout_s: float,
) -> Checked:
    """Whether `url` serves the signed manifest of `version`, or of the one before, and what
    it says it served. A relay a moment behind a fresh publish is not a liar: one that lacks
    `version`'s manifest, or has it and is still mirroring its shards (503), is judged on the
    version before. A pool publishing every step caught its honest relay mid-mirror often
    enough that a check every 30 s kept it unverified for a minute at a time. A stream
    source must also hold a slot on our hop: the check reaches it over its own connection to
    us, but fetchers reach it only through the hop."""
    from shardcast.probe import ProbeStatus, verify_source

    peer = stream_peer(url)
    if peer is not None and (hop is None or not hop.holds_slot(peer)):
        return Checked(NO_SLOT)
    for v in (version, version - 1) if version > 0 else (version,):
        result = await verify_source(url, public_key, pool_id, v, timeout_s=timeout_s, http=http)
        if result.ok:
            return Checked(None, v, await relay_served(url, http))
        if result.status not in (ProbeStatus.NOT_HELD, ProbeStatus.NOT_READY):
            break
    return Checked(result.status.value)


async def relay_served(
    url: str, http: httpx.AsyncClient, timeout_s: float = 3.0, max_bytes: int = 64 * 1024
) -> int | None:
    """The bytes a verified relay says it served (`GET /stats`), bounded in time and size;
    None when it does not answer sensibly."""
    try:
        with trio.move_on_after(timeout_s):
            async with http.stream("GET", f"{url.rstrip('/')}/stats") as r:
                body = b""
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        return None
                total = json.loads(body).get("total")
                return total if isinstance(total, int) and total >= 0 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return None


@asynccontextmanager
async def relay_hop(
    libp2p_host: Any,
    limits: HopLimits | None,
    is_active: Callable[[bytes], bool],
) -> AsyncIterator[P2PNode | None]:
    """The coordinator's circuit-relay hop (and AutoNAT server) on its own libp2p host, for
    pool nodes in good standing only (`is_active(public key)`: joined, not banned), within
    `limits`; None when `limits` is None (no hop). Each slot and circuit is the
    coordinator's bandwidth and CPU."""
    if limits is None:
        yield None
        return
    admit = partial(admitted_peer, is_active)
    # DCUtR is for the ends of a circuit; the coordinator is only ever its middle.
    async with attach_node(libp2p_host, hop=limits, admit=admit, dcutr=False) as n:
        yield n


def admitted_peer(is_in: Callable[[bytes], bool], peer_id: str) -> bool:
    """Whether the libp2p peer `peer_id` is a pool node whose public key `is_in` names (in good
    standing, trusted, ...)."""
    try:
        return is_in(public_key_of_peer(peer_id))
    except ProtocolError:  # not an ed25519 peer id: never a pool node
        return False


def probe_client(node: P2PNode | None, timeout_s: float) -> httpx.AsyncClient:
    """The client relay checks go through: `p2p://` sources only over a connection the node
    already holds to the coordinator (`P2PNode.open_connected_stream`), never a dial or a
    circuit, so advertising a stream source cannot make the coordinator open connections.
    No HTTP connection is kept between requests, as when each check had its own client:
    checks come every `recheck_s` (30 s), long after a relay's server closed an idle
    connection, and a stale one that fails reads as `unreachable` and drops a good relay
    until its next check (a CI run saw a verified relay dropped so; the cause is not
    proven)."""
    mounts = {f"{SCHEME}://": P2PTransport(node.open_connected_stream)} if node else None
    return httpx.AsyncClient(
        timeout=timeout_s,
        follow_redirects=False,
        mounts=mounts,
        limits=httpx.Limits(max_keepalive_connections=0),
    )
