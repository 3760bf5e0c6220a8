"""Pool discovery by peer exchange: from a pool id and any one pool member to the coordinator.

The coordinator signs a `PoolRecord`: the canonical pool spec and the addresses it listens on.
Every pool member keeps the newest record it has seen and answers `/swarmrl/pool/1.0.0` queries
with it, plus a few other members' addresses to try. A newcomer asks its bootstrap peers, walks
the addresses they give (breadth first, a bounded number of queries), and accepts a record only
when

1. the spec in it hashes to the pool id it was given (`poolspec.from_canonical`), and
2. the record is signed by the coordinator key named inside that spec.

So the members that pass the record along are not trusted at all: a liar can withhold it or
waste our time, never redirect us. The coordinator's peer id follows from its key, so the
Noise handshake of the first dial checks the addresses too.

A record expires (`expires_ms`, signed with it), so an old one cannot be passed around forever:
the coordinator re-signs its record every few minutes (`refresh_record`), members fetch the
fresh one before theirs expires (`follow_pool_record`), and the newest valid record wins.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar

import msgspec
import trio

from protocol import poolspec
from protocol.envelope import ENVELOPE_OVERHEAD, Envelope, Verified, seal
from protocol.errors import DiscoveryError, PoolSpecError, ProtocolError, SwarmError
from protocol.host import Host, SharePolicy, parse_multiaddr
from protocol.identity import Identity, peer_id_of, verify_signature
from protocol.poolspec import PoolSpec
from protocol.wire import WIRE_VERSION, Message, ShortStr, UInt
from protocol.wire import decode as decode_message
from shardcast.scope import dial_floor, may_dial

log = logging.getLogger("swarmrl.protocol.discovery")

DISCOVERY_PROTOCOL = "/swarmrl/pool/1.0.0"
MAX_ADDRS = 16
MAX_SPEC_BYTES = 32 * 1024
RECORD_TTL_S = 30 * 60
"""Life of a pool record. Long enough that members refreshing at half-life ask rarely; short
enough that a coordinator that moved is found at its new address within about this long."""
MAX_RECORD_TTL_S = 24 * 3600
"""No record is accepted for longer than this, whatever it says: a leaked or mistaken record
cannot outlive a day."""
RECORD_SKEW_S = 60.0
"""Clock difference tolerated between the coordinator and whoever checks its record."""

Addrs = Annotated[list[ShortStr], msgspec.Meta(max_length=MAX_ADDRS)]


class PoolRecord(Message, tag="pool-record"):
    """Signed by the coordinator: the pool's spec and where the coordinator listens."""

    max_bytes: ClassVar[int] = MAX_SPEC_BYTES + MAX_ADDRS * 300
    spec: Annotated[bytes, msgspec.Meta(max_length=MAX_SPEC_BYTES)]
    """`poolspec.canonical_bytes` of the spec."""
    addrs: Addrs
    """Multiaddrs of the coordinator, without the `/p2p/` suffix."""
    expires_ms: UInt
    """Unix time (ms) after which the record is refused; it was issued at the envelope's
    `timestamp_ms`, which the same signature covers."""


class PoolQuery(Message, tag="pool-query"):
    """Where is this pool's coordinator? (The pool is the envelope's.)"""

    max_bytes: ClassVar[int] = 256
    max_peers: Annotated[int, msgspec.Meta(ge=0, le=MAX_ADDRS)] = 8


class PoolInfo(Message, tag="pool-info"):
    """A member's answer: the coordinator's signed record if it has one, and peers to ask."""

    max_bytes: ClassVar[int] = PoolRecord.max_bytes + ENVELOPE_OVERHEAD + MAX_ADDRS * 300
    record: bytes = b""
    """The coordinator's sealed `PoolRecord`, verbatim; empty when this member has none."""
    peers: Addrs = msgspec.field(default_factory=list)
    """Other members' multiaddrs (with `/p2p/`) that may know."""


@dataclass(frozen=True)
class PoolLocation:
    """What discovery found, every part checked against the pool id."""

    spec: PoolSpec
    coordinator_peer_id: str
    coordinator_addrs: list[str]
    """Dialable multiaddrs, each ending in `/p2p/<coordinator peer id>`."""
    issued_ms: int
    expires_ms: int
    record: bytes
    """The signed record, to keep and pass on to the next newcomer."""

    def expired(self, now: float | None = None) -> bool:
        now_ms = (time.time() if now is None else now) * 1000
        return now_ms > self.expires_ms + RECORD_SKEW_S * 1000


def make_pool_record(
    coordinator: Identity,
    spec: PoolSpec,
    addrs: Sequence[str],
    now: float | None = None,
    ttl_s: float = RECORD_TTL_S,
) -> bytes:
    """The coordinator's signed record of `spec` and its listen addresses, valid `ttl_s`."""
    if spec.coordinator.public_key != coordinator.public_key.hex():
        raise SwarmError("this key is not the coordinator named in the pool spec")
    if not 0 < ttl_s <= MAX_RECORD_TTL_S:
        raise ValueError(f"ttl_s must be in (0, {MAX_RECORD_TTL_S}], got {ttl_s}")
    now = time.time() if now is None else now
    clean = [_strip_p2p(a) for a in addrs][:MAX_ADDRS]
    expires_ms = int((now + ttl_s) * 1000)
    record = PoolRecord(spec=poolspec.canonical_bytes(spec), addrs=clean, expires_ms=expires_ms)
    return seal(coordinator, poolspec.pool_id(spec), record, now=now)


def open_pool_record(data: bytes, pool_id: str, now: float | None = None) -> PoolLocation:
    """Check a record received from anyone; `ProtocolError` unless it is the coordinator's and
    valid at `now` (default: the clock).

    Unlike `EnvelopeVerifier.open` there is no replay window: a record is meant to be passed on
    until it expires, and replaying it only repeats the truth.
    """
    env = decode_message(data, Envelope, max_bytes=PoolRecord.max_bytes + ENVELOPE_OVERHEAD)
    if env.version != WIRE_VERSION:
        raise ProtocolError(f"pool record of wire version {env.version}, expected {WIRE_VERSION}")
    if env.kind != PoolRecord.kind():
        raise ProtocolError(f"expected a {PoolRecord.kind()!r}, got {env.kind!r}")
    if env.pool != pool_id:
        raise ProtocolError(f"pool record is for pool {env.pool}, not {pool_id}")
    record = decode_message(env.body, PoolRecord)
    try:
        spec = poolspec.from_canonical(record.spec, pool_id)
    except PoolSpecError as e:
        raise ProtocolError(str(e)) from None
    coordinator_key = bytes.fromhex(spec.coordinator.public_key)
    if env.signer != coordinator_key:
        raise ProtocolError(
            f"pool record signed by {env.signer.hex()[:12]}, not by the pool's coordinator "
            f"{coordinator_key.hex()[:12]}"
        )
    if not verify_signature(env.signer, env.signed_bytes(), env.signature):
        raise ProtocolError("pool record has a bad signature")
    _check_lifetime(env.timestamp_ms, record.expires_ms, time.time() if now is None else now)
    peer_id = peer_id_of(coordinator_key)
    addrs = [f"{_strip_p2p(a)}/p2p/{peer_id}" for a in record.addrs]
    if not addrs:
        raise ProtocolError("pool record lists no coordinator address")
    return PoolLocation(spec, peer_id, addrs, env.timestamp_ms, record.expires_ms, bytes(data))


def _check_lifetime(issued_ms: int, expires_ms: int, now: float) -> None:
    now_ms, skew_ms = now * 1000, RECORD_SKEW_S * 1000
    # A record from the future would win every "newest" comparison until then.
    if issued_ms > now_ms + skew_ms:
        raise ProtocolError(
            f"pool record issued {(issued_ms - now_ms) / 1000:.0f} s in the future; "
            "check this machine's clock or the coordinator's"
        )
    if not 0 < expires_ms - issued_ms <= MAX_RECORD_TTL_S * 1000:
        raise ProtocolError(
            f"pool record lifetime of {(expires_ms - issued_ms) / 1000:.0f} s is outside "
            f"(0, {MAX_RECORD_TTL_S}] s"
        )
    if now_ms > expires_ms + skew_ms:
        raise ProtocolError(f"pool record expired {(now_ms - expires_ms) / 1000:.0f} s ago")


class PoolBook:
    """What a member knows about its pool: the newest valid coordinator record (one, so its
    size is that of one record) and a bounded list of other members.

    Serve it with `serve_discovery`; the coordinator keeps it filled with `refresh_record`,
    members with `discover` and `follow_pool_record`.
    """

    def __init__(self, pool_id: str, max_peers: int = 64) -> None:
        self.pool_id = pool_id
        self.max_peers = max_peers
        self._location: PoolLocation | None = None
        self._peers: OrderedDict[str, None] = OrderedDict()

    @property
    def location(self) -> PoolLocation | None:
        """The newest record learned, or None when there is none or it has expired."""
        if self._location is not None and self._location.expired():
            self._location = None
        return self._location

    def learn(self, record: bytes, now: float | None = None) -> PoolLocation:
        """Keep `record` if it is valid and newer than the one held; return the one held."""
        location = open_pool_record(record, self.pool_id, now)
        held = self.location
        if held is None or location.issued_ms > held.issued_ms:
            self._location = held = location
        return held

    def add_peer(self, addr: str) -> None:
        """Remember a member's multiaddr (with `/p2p/`) to hand to newcomers."""
        parse_multiaddr(addr)
        if "/p2p/" not in addr:
            raise ProtocolError(f"{addr!r} has no /p2p/<peer id>; a newcomer could not check it")
        self._peers[addr] = None
        self._peers.move_to_end(addr)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)

    def peers(self, limit: int = MAX_ADDRS) -> list[str]:
        newest_first = list(reversed(self._peers))
        return newest_first[: min(limit, MAX_ADDRS)]


def serve_discovery(host: Host, book: PoolBook, share_of: SharePolicy | None = None) -> None:
    """Answer pool queries from anyone (a newcomer is by definition not yet a member);
    `share_of` as for `Host.serve`."""

    async def answer(request: Verified[PoolQuery]) -> PoolInfo:
        location = book.location  # None once expired: an expired record is never passed on
        record = location.record if location is not None else b""
        mine = set(host.addrs)
        peers = [p for p in book.peers(request.message.max_peers + len(mine)) if p not in mine]
        return PoolInfo(record=record, peers=peers[: request.message.max_peers])

    host.serve(DISCOVERY_PROTOCOL, answer, PoolQuery, PoolInfo, share_of=share_of)


async def discover(
    host: Host,
    bootstrap: Sequence[str],
    *,
    max_queries: int = 16,
    query_timeout_s: float = 10.0,
    timeout_s: float = 60.0,
    book: PoolBook | None = None,
    newer_than_ms: int = 0,
) -> PoolLocation:
    """Find `host.pool_id`'s coordinator through `bootstrap` peers (any pool members).

    Asks peers breadth first, at most `max_queries` of them, and returns the first valid record
    issued after `newer_than_ms`. Peers that fail or lie are skipped (and logged); when none had
    such a record, `DiscoveryError` says what each one did. When `book` is given, the members it
    knows are asked after `bootstrap`, it learns the record and the peers that answered (so this
    host can answer the next newcomer), and the newest record it holds is returned.

    Safe to call again at any time, e.g. after joins keep failing: pass the same `book`, and
    `newer_than_ms=location.issued_ms` of the record that led nowhere, so that only a record the
    coordinator signed since counts.
    """
    pool_id = host.pool_id
    queue = list(dict.fromkeys([*bootstrap, *(book.peers() if book is not None else [])]))
    if not queue:
        raise DiscoveryError("no bootstrap peer given; pass at least one pool member's multiaddr")
    asked: set[str] = set(host.addrs)  # never ask ourselves
    # The peers an answer names are a stranger's word: dialled only as far out as the
    # bootstrap peers are, or a liar aims our dials (and times them) at our loopback or LAN.
    floor = dial_floor(bootstrap)
    queries = 0
    problems: list[str] = []
    with trio.move_on_after(timeout_s):
        while queue and queries < max_queries:
            addr = queue.pop(0)
            if addr in asked:
                continue
            asked.add(addr)
            queries += 1
            try:
                info = await _ask(host, addr, query_timeout_s, book)
            except SwarmError as e:
                problems.append(f"{addr}: {e}")
                continue
            queue.extend(p for p in info.peers if p not in asked and may_dial(p, floor))
            try:
                location = _newer_location(info, pool_id, newer_than_ms)
            except ProtocolError as e:
                # A member that lies or lags behind is skipped; the next may not.
                log.info("discovery: %s %s", addr, e)
                problems.append(f"{addr}: {e}")
                continue
            return location if book is None else book.learn(location.record)
    detail = "; ".join(problems[-8:]) or "no peer answered in time"
    raise DiscoveryError(
        f"could not find the coordinator of pool {pool_id} after asking {queries} peer(s): {detail}"
    )


async def _ask(host: Host, addr: str, timeout_s: float, book: PoolBook | None) -> PoolInfo:
    reply = await host.request(addr, DISCOVERY_PROTOCOL, PoolQuery(), PoolInfo, timeout_s=timeout_s)
    if book is not None and "/p2p/" in addr:
        book.add_peer(addr)
    return reply.message


def _newer_location(info: PoolInfo, pool_id: str, newer_than_ms: int) -> PoolLocation:
    if not info.record:
        raise ProtocolError("has no pool record")
    try:
        location = open_pool_record(info.record, pool_id)
    except ProtocolError as e:
        raise ProtocolError(f"sent a bad pool record: {e}") from None
    if location.issued_ms <= newer_than_ms:
        raise ProtocolError("has no record newer than the one we hold")
    return location


async def refresh_record(
    coordinator: Identity,
    spec: PoolSpec,
    host: Host,
    book: PoolBook,
    *,
    ttl_s: float = RECORD_TTL_S,
    every_s: float | None = None,
    task_status: trio.TaskStatus[PoolLocation] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Coordinator side: keep a freshly signed record of `host.addrs` in `book`, forever.

    Signs one at once, reports it through `task_status` (so `await nursery.start(...)` returns
    once the book can be served), then re-signs every `every_s` (default a sixth of `ttl_s`,
    so members refreshing at half-life always find one with most of its life left).
    """
    interval = ttl_s / 6 if every_s is None else every_s
    if not 0 < interval < ttl_s:
        raise ValueError(f"every_s must be in (0, ttl_s), got {interval} with ttl_s={ttl_s}")
    task_status.started(book.learn(make_pool_record(coordinator, spec, host.addrs, ttl_s=ttl_s)))
    while True:
        await trio.sleep(interval)
        book.learn(make_pool_record(coordinator, spec, host.addrs, ttl_s=ttl_s))


async def follow_pool_record(
    host: Host,
    book: PoolBook,
    bootstrap: Sequence[str] = (),
    *,
    retry_s: float = 30.0,
    query_timeout_s: float = 10.0,
) -> None:
    """Member side: fetch a newer record whenever the one in `book` is past half its life.

    Asks the coordinator first (its record is the freshest), then `bootstrap` and the members
    the book knows. Failures are logged and retried after `retry_s`; runs until cancelled.
    """
    while True:
        held = book.location
        if held is not None:
            half_life_ms = held.issued_ms + (held.expires_ms - held.issued_ms) / 2
            await trio.sleep(max(0.0, half_life_ms / 1000 - time.time()))
        where = [*(held.coordinator_addrs if held is not None else []), *bootstrap]
        try:
            await discover(
                host,
                where,
                book=book,
                query_timeout_s=query_timeout_s,
                newer_than_ms=held.issued_ms if held is not None else 0,
            )
        except DiscoveryError as e:
            log.warning("could not refresh the pool record: %s", e)
            await trio.sleep(retry_s)


def _strip_p2p(addr: str) -> str:
    """`addr` without a trailing `/p2p/<id>`, checked to be a multiaddr."""
    parse_multiaddr(addr)
    head, sep, _ = addr.partition("/p2p/")
    return head if sep else addr
