"""The coordinator's signed peer list: which URLs serve this pool's weights, vouched for.

Peer announcements (peers.py) are each node's own claim. The coordinator knows more: it
probed every URL it hands out (`shardcast.probe`). It signs that list like a manifest
(ed25519, domain-separated) so that anyone may carry it: the origin serves it on
`GET /peerlist`, every relay and swarm member re-serves the newest one it verified, and a
late joiner gets it from its first source like any other signed object. Receivers check,
before using a URL in it: size, envelope, that the key is the pool's coordinator key, the
signature, the pool, that it is not expired nor dated in the future, and that it is newer
(`seq`) than the list they hold, so an old list cannot be replayed over a newer one.

A URL in the list is still only a place to ask: every byte from it is checked against the
signed manifest, like every other source.
"""

from __future__ import annotations

import time
from typing import Annotated

import msgspec

from protocol.identity import Identity
from shardcast.errors import ShardcastError
from shardcast.signed import seal, unseal

DOMAIN = b"swarmrl/shardcast/peerlist/v1\n"
MAX_URLS = 256
MAX_PEER_LIST_BYTES = 128 * 1024
MAX_SKEW = 30.0  # seconds a list may be dated in the future (clocks differ)
DEFAULT_TTL = 600.0

ListedUrl = Annotated[
    str,
    msgspec.Meta(
        max_length=256, pattern=r"^(https?://[^\s/?#]+|p2p://peer/[1-9A-HJ-NP-Za-km-z]{1,64})$"
    ),
]
"""An http(s) base URL, or a node served over libp2p streams (`p2p://peer/<peer id>`, which
a pool's fetchers reach through the coordinator's relay hop: the list need not carry its
circuit address)."""


class PeerListError(ShardcastError):
    """A peer list is malformed, badly signed, for another pool, expired or not newer."""


class PeerList(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pool_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    """Increases with every list the coordinator signs: the newest wins."""
    issued: float
    ttl: Annotated[float, msgspec.Meta(gt=0, le=86400)]
    urls: Annotated[list[ListedUrl], msgspec.Meta(max_length=MAX_URLS)]


_body_decoder = msgspec.msgpack.Decoder(PeerList)
_encoder = msgspec.msgpack.Encoder()


def sign_peer_list(
    identity: Identity,
    pool_id: str,
    urls: list[str],
    seq: int,
    ttl: float = DEFAULT_TTL,
    now: float | None = None,
) -> bytes:
    """The coordinator's signed list of `urls` (deduplicated, order kept, at most
    `MAX_URLS`), as served on `GET /peerlist`."""
    unique = list(dict.fromkeys(u.rstrip("/") for u in urls))[:MAX_URLS]
    body = _encoder.encode(
        PeerList(
            pool_id=pool_id,
            seq=seq,
            issued=time.time() if now is None else now,
            ttl=ttl,
            urls=unique,
        )
    )
    return seal(body, identity, DOMAIN)


def open_peer_list(
    data: bytes,
    *,
    public_key: bytes,
    pool_id: str,
    newer_than: int = -1,
    now: float | None = None,
) -> PeerList:
    """Check and decode peer-list bytes from anyone; PeerListError if they are not a fresh
    list signed by the pool's coordinator with a `seq` above `newer_than`."""
    pl = unseal(
        data,
        public_key=public_key,
        pool_id=pool_id,
        domain=DOMAIN,
        max_bytes=MAX_PEER_LIST_BYTES,
        body=_body_decoder,
        what="peer list",
        error=PeerListError,
    )
    now = time.time() if now is None else now
    if pl.issued > now + MAX_SKEW:
        raise PeerListError("peer list is dated in the future")
    if pl.issued + pl.ttl <= now:
        raise PeerListError("peer list has expired")
    if pl.seq <= newer_than:
        raise PeerListError(f"peer list {pl.seq} is not newer than {newer_than}")
    return pl


class PeerListHolder:
    """The newest verified peer list a server holds and re-serves (its exact signed bytes)."""

    def __init__(self, public_key: bytes, pool_id: str) -> None:
        self.public_key = public_key
        self.pool_id = pool_id
        self.raw: bytes | None = None
        self.current: PeerList | None = None

    def offer(self, data: bytes, now: float | None = None) -> PeerList:
        """Keep `data` if it is a valid list newer than the one held; PeerListError if not
        (the one held stays)."""
        newer_than = self.current.seq if self.current is not None else -1
        pl = open_peer_list(
            data, public_key=self.public_key, pool_id=self.pool_id, newer_than=newer_than, now=now
        )
        self.raw, self.current = data, pl
        return pl

    def urls(self, now: float | None = None) -> list[str]:
        """The held list's URLs while it is fresh; none once it has expired."""
        pl = self.current
        now = time.time() if now is None else now
        if pl is None or pl.issued + pl.ttl <= now:
            return []
        return list(pl.urls)
