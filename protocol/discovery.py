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
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar

import msgspec
import trio

from protocol import poolspec
from protocol.envelope import ENVELOPE_OVERHEAD, Envelope, Verified, seal
from protocol.errors import DiscoveryError, PoolSpecError, ProtocolError, SwarmError
from protocol.host import Host, parse_multiaddr
from protocol.identity import Identity, peer_id_of, verify_signature
from protocol.poolspec import PoolSpec
from protocol.wire import WIRE_VERSION, Message, ShortStr
from protocol.wire import decode as decode_message

log = logging.getLogger("swarmrl.protocol.discovery")

DISCOVERY_PROTOCOL = "/swarmrl/pool/1.0.0"
MAX_ADDRS = 16
MAX_SPEC_BYTES = 32 * 1024

Addrs = Annotated[list[ShortStr], msgspec.Meta(max_length=MAX_ADDRS)]


class PoolRecord(Message, tag="pool-record"):
    """Signed by the coordinator: the pool's spec and where the coordinator listens."""

    max_bytes: ClassVar[int] = MAX_SPEC_BYTES + MAX_ADDRS * 300
    spec: Annotated[bytes, msgspec.Meta(max_length=MAX_SPEC_BYTES)]
    """`poolspec.canonical_bytes` of the spec."""
    addrs: Addrs
    """Multiaddrs of the coordinator, without the `/p2p/` suffix."""


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
    record: bytes
    """The signed record, to keep and pass on to the next newcomer."""


def make_pool_record(
    coordinator: Identity, spec: PoolSpec, addrs: Sequence[str], now: float | None = None
) -> bytes:
    """The coordinator's signed record of `spec` and its listen addresses."""
    if spec.coordinator.public_key != coordinator.public_key.hex():
        raise SwarmError("this key is not the coordinator named in the pool spec")
    clean = [_strip_p2p(a) for a in addrs][:MAX_ADDRS]
    record = PoolRecord(spec=poolspec.canonical_bytes(spec), addrs=clean)
    return seal(coordinator, poolspec.pool_id(spec), record, now=now)


def open_pool_record(data: bytes, pool_id: str) -> PoolLocation:
    """Check a record received from anyone; `ProtocolError` unless it is the coordinator's.

    Unlike `EnvelopeVerifier.open` there is no replay window: a record is meant to be passed on
    for as long as the coordinator stays where it is, and replaying it only repeats the truth.
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
    peer_id = peer_id_of(coordinator_key)
    addrs = [f"{_strip_p2p(a)}/p2p/{peer_id}" for a in record.addrs]
    if not addrs:
        raise ProtocolError("pool record lists no coordinator address")
    return PoolLocation(spec, peer_id, addrs, env.timestamp_ms, bytes(data))


class PoolBook:
    """What a member knows about its pool: the newest coordinator record and other members.

    Serve it with `serve_discovery`; the coordinator fills it with `make_pool_record`, members
    with what `discover` returned.
    """

    def __init__(self, pool_id: str, max_peers: int = 64) -> None:
        self.pool_id = pool_id
        self.max_peers = max_peers
        self.location: PoolLocation | None = None
        self._peers: OrderedDict[str, None] = OrderedDict()

    def learn(self, record: bytes) -> PoolLocation:
        """Keep `record` if it is valid and newer than the one held; return the one held."""
        location = open_pool_record(record, self.pool_id)
        if self.location is None or location.issued_ms > self.location.issued_ms:
            self.location = location
        return self.location

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


def serve_discovery(host: Host, book: PoolBook) -> None:
    """Answer pool queries from anyone (a newcomer is by definition not yet a member)."""

    async def answer(request: Verified[PoolQuery]) -> PoolInfo:
        record = book.location.record if book.location is not None else b""
        mine = set(host.addrs)
        peers = [p for p in book.peers(request.message.max_peers + len(mine)) if p not in mine]
        return PoolInfo(record=record, peers=peers[: request.message.max_peers])

    host.serve(DISCOVERY_PROTOCOL, answer, PoolQuery, PoolInfo)


async def discover(
    host: Host,
    bootstrap: Sequence[str],
    *,
    max_queries: int = 16,
    query_timeout_s: float = 10.0,
    timeout_s: float = 60.0,
    book: PoolBook | None = None,
) -> PoolLocation:
    """Find `host.pool_id`'s coordinator through `bootstrap` peers (any pool members).

    Asks peers breadth first, at most `max_queries` of them, and returns the first record that
    checks out. Peers that fail or lie are skipped (and logged); when none had a valid record,
    `DiscoveryError` says what each one did. When `book` is given it learns the record and the
    peers that answered, so this host can answer the next newcomer.
    """
    pool_id = host.pool_id
    queue = list(dict.fromkeys(bootstrap))
    if not queue:
        raise DiscoveryError("no bootstrap peer given; pass at least one pool member's multiaddr")
    asked: set[str] = set(host.addrs)  # never ask ourselves
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
                reply = await host.request(
                    addr, DISCOVERY_PROTOCOL, PoolQuery(), PoolInfo, timeout_s=query_timeout_s
                )
            except SwarmError as e:
                problems.append(f"{addr}: {e}")
                continue
            info = reply.message
            if book is not None and "/p2p/" in addr:
                book.add_peer(addr)
            if info.record:
                try:
                    location = open_pool_record(info.record, pool_id)
                except ProtocolError as e:
                    # A member that passes on a bad record is wrong or lying; the next may not be.
                    log.warning("pool record from %s refused: %s", addr, e)
                    problems.append(f"{addr}: sent a bad pool record: {e}")
                else:
                    if book is not None:
                        book.learn(location.record)
                    return location
            else:
                problems.append(f"{addr}: has no pool record")
            queue.extend(p for p in info.peers if p not in asked)
    detail = "; ".join(problems[-8:]) or "no peer answered in time"
    raise DiscoveryError(
        f"could not find the coordinator of pool {pool_id} after asking {queries} peer(s): {detail}"
    )


def _strip_p2p(addr: str) -> str:
    """`addr` without a trailing `/p2p/<id>`, checked to be a multiaddr."""
    parse_multiaddr(addr)
    head, sep, _ = addr.partition("/p2p/")
    return head if sep else addr
