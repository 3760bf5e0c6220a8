"""Typed decoders for what peers and upstreams answer in JSON (`/versions`, `/have`, `/peers`).

Every such answer is untrusted. Parsed with `json.loads` and read field by field, a few
bytes ended a member's `Relay.run`: `"changes": Infinity` (valid to Python's json) made
`int()` raise OverflowError, and 4 KB of nested brackets made the parser raise
RecursionError, neither of which the loops caught. Here each answer is decoded into a struct
of exactly the types and ranges its endpoint has (integers only, never booleans or floats;
versions as a server can serve them), and any failure, nesting too deep included, is one
`BadAnswer`, which the loops count as a fault of that peer.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec

from shardcast.errors import BadAnswer
from shardcast.sources import MAX_LISTED

MAX_VERSION = 10**18 - 1
"""Largest version a server answers for (`server.parse_version`: 18 digits). A listing naming
a larger one names a version no honest server holds: asked for it, an honest server answers
400, which once scored as a corrupt manifest and had honest sources banned."""
Version = Annotated[int, msgspec.Meta(ge=0, le=MAX_VERSION)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class ListedVersion(msgspec.Struct):
    version: Version
    base: Version | None = None


class Listing(msgspec.Struct):
    """`GET /versions` (other fields, such as `latest` and `complete`, are not read)."""

    versions: list[ListedVersion]

    def bases(self) -> dict[int, int | None]:
        """{version: base} for the newest `MAX_LISTED` versions listed: only those matter,
        and a long listing must not grow our tables."""
        out = {v.version: v.base for v in self.versions}
        return {v: out[v] for v in sorted(out)[-MAX_LISTED:]}


class Have(msgspec.Struct):
    """`GET /v/{N}/have`: hex bitfields of the units held and being fetched from a seed,
    and how many payload streams the peer is sending (a claim: see `SourceStats.streams`)."""

    bits: str
    soon: str = ""
    changes: Count | None = None
    streams: Count = 0


class PeersAnswer(msgspec.Struct):
    """`GET /peers`: announcements, each kept as its raw bytes for `PeerTable.add` to check."""

    peers: list[msgspec.Raw] = []


T = TypeVar("T")
LISTING = msgspec.json.Decoder(Listing)
HAVE = msgspec.json.Decoder(Have)
PEERS = msgspec.json.Decoder(PeersAnswer)


def decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """`body` decoded by `decoder`; BadAnswer if it does not fit."""
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as e:  # DecodeError: ValidationError too
        raise BadAnswer(f"malformed answer: {e}"[:200]) from None
