"""Who else serves this pool's weights: signed, expiring peer announcements.

Every node that re-serves signs its own reachable URL with its identity key
(`announce`). Announcements travel by gossip over HTTP: each server (origin, relay,
node) keeps a `PeerTable`, accepts announcements on `POST /peers` and hands out the fresh
ones on `GET /peers`; a node pushes its own to the servers it knows and pulls theirs, so a
late joiner learns the whole swarm from its first source. The origin needs no code of its
own for this: it is one more table.

An announcement only proves that a key claimed a URL recently. It is never trusted as a
source of bytes: every shard from a peer is checked against the signed manifest, a peer
that fails is scored down and dropped by the `SourcePicker`, and an unproven peer gets one
transfer at a time. Tables are bounded (one entry per key, `MAX_PEERS` entries) and entries
expire, so a flood of announcements costs little.

Keys are free, so a full table must not be won by announcing most or newest. Ranked by the
date an announcement claims, 256 dated `MAX_SKEW` ahead (accepted: clocks differ) outranked
every honest one, and each honest re-announcement was accepted and evicted by the same add:
one sender locked the swarm's members out of every table. So an entry ranks by its date no
later than when it arrived (`_Entry.heard`), and a full table evicts from the host that
holds the most entries (an IPv6 /64 as one host, every DNS name as one: `host_key`): one
host fills a table only while no other host wants a place in it.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Annotated, NamedTuple
from urllib.parse import urlsplit

import msgspec

from protocol.identity import Identity, verify_signature
from protocol.ratelimit import client_key
from protocol.wire import PublicKey, Signature
from shardcast.scope import plain_ip

DOMAIN = b"swarmrl/shardcast/peer/v1\n"
TTL = 300.0  # seconds an announcement stays valid; nodes re-announce every TTL / 3
MAX_SKEW = 30.0  # an announcement dated further into the future than this is refused
MAX_PEERS = 256
MAX_ANNOUNCEMENT_BYTES = 2048

URL_PATTERN = r"^https?://[^\s/?#@]+$"
"""No userinfo (`user@`): `http://uN@host:port` made one socket as many distinct URLs."""
Url = Annotated[str, msgspec.Meta(max_length=256, pattern=URL_PATTERN)]


def announceable(url: str) -> bool:
    """Whether tables accept an announcement of `url`: HTTP only. A member reached by libp2p
    stream (`p2p://peer/<id>`) is vouched for by the coordinator's signed list instead."""
    return len(url) <= 256 and re.match(URL_PATTERN, url) is not None


class Announcement(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pool_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    url: Url
    public_key: PublicKey
    issued: float
    signature: Signature

    def signed_bytes(self) -> bytes:
        body = msgspec.msgpack.encode([self.pool_id, self.url, self.public_key, self.issued])
        return DOMAIN + body


_decoder = msgspec.json.Decoder(Announcement)
_encoder = msgspec.json.Encoder()


def announce(identity: Identity, pool_id: str, url: str, now: float | None = None) -> bytes:
    """This node's signed claim that it serves `pool_id`'s weights at `url` (JSON bytes)."""
    issued = time.time() if now is None else now
    unsigned = Announcement(
        pool_id=pool_id,
        url=url.rstrip("/"),
        public_key=identity.public_key,
        issued=issued,
        signature=bytes(64),
    )
    signed = msgspec.structs.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))
    return _encoder.encode(signed)


def host_key(url: str) -> str:
    """Whose place in a table an announced URL takes: its IP address (an IPv6 /64 as one,
    `client_key`), or one key for every DNS name (names are free, and followed only in a
    pool on one machine: `shardcast.scope`)."""
    host = urlsplit(url).hostname or ""
    try:
        return client_key(str(plain_ip(host)))
    except ValueError:
        return "(names)"


class _Entry(NamedTuple):
    announcement: Announcement
    heard: float
    """Its date, but never later than when it arrived: what it ranks and expires by."""
    host: str


class PeerTable:
    def __init__(self, pool_id: str, own_key: bytes | None = None) -> None:
        self.pool_id = pool_id
        self.own_key = own_key
        self._by_key: dict[bytes, _Entry] = {}

    def add(self, data: bytes, now: float | None = None) -> Announcement | None:
        """Check and keep one announcement; None if refused (malformed, badly signed,
        another pool, stale, from the future, or our own)."""
        now = time.time() if now is None else now
        if len(data) > MAX_ANNOUNCEMENT_BYTES:
            return None
        try:
            a = _decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        if a.pool_id != self.pool_id or a.public_key == self.own_key:
            return None
        if not (now - TTL < a.issued < now + MAX_SKEW):
            return None
        old = self._by_key.get(a.public_key)
        if old is not None and old.announcement.issued >= a.issued:
            return None  # replayed or older: nothing new
        if not verify_signature(a.public_key, a.signed_bytes(), a.signature):
            return None
        self._by_key[a.public_key] = _Entry(a, min(a.issued, now), host_key(a.url))
        self._evict(now)
        return a

    def fresh(self, now: float | None = None) -> list[Announcement]:
        now = time.time() if now is None else now
        self._evict(now)
        newest = sorted(self._by_key.values(), key=lambda e: -e.heard)
        return [e.announcement for e in newest]

    def urls(self, now: float | None = None) -> list[str]:
        return [a.url for a in self.fresh(now)]

    def encoded(self, limit: int = 64) -> list[bytes]:
        """The newest `limit` announcements, as served on `GET /peers`."""
        return [_encoder.encode(a) for a in self.fresh()[:limit]]

    def _evict(self, now: float) -> None:
        for key, e in list(self._by_key.items()):
            if e.heard <= now - TTL:
                del self._by_key[key]
        while len(self._by_key) > MAX_PEERS:
            del self._by_key[self._evictee()]

    def _evictee(self) -> bytes:
        """The key to evict from a full table: the oldest entry of the host holding most."""
        held = Counter(e.host for e in self._by_key.values())
        most = max(held.values())
        crowded = [e for e in self._by_key.values() if held[e.host] == most]
        return min(crowded, key=lambda e: e.heard).announcement.public_key
