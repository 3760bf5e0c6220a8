"""The signed manifest: what a version is, byte for byte.

A manifest names the files a version ends up as (`files`: path, size, BLAKE3 hash) and the
payload that is transferred to get there (`payload`: for a full version the files themselves,
for a delta version one encoded delta per changed file: a file the delta leaves as it was in
the base, a tokenizer say, has no payload and is taken from the base, checked against its
hash in `files`). Each payload file is cut into shards of
`shard_size` bytes with one BLAKE3 hash each, so a receiver checks every shard as it streams
and knows exactly which source sent a bad one. A manifest may also cut each payload file
into smaller *pieces* (`piece_size`, a divisor of `shard_size`) with one hash each: pieces
are then the unit every transfer, bitfield and cut-through wait uses, so a swarm member
re-serves a piece the moment it is verified. Manifests without pieces (older ones) work
as before, with the shard as the unit (`units`).

A version may name other versions it is unusable without (`requires`: a LoRA adapter
version requires its base). Every holder retains them while a version it keeps requires
them, and a client fetches them with the version, so a node that joins long after the base
was published still gets it. Each requirement is older than the version, so requirements
never form a cycle.

On the wire a manifest is a `SignedManifest`: the msgpack body and the coordinator's ed25519
signature of `DOMAIN + body`. Nothing in the body is read before the signature and the pool id
are checked (`open_manifest`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from protocol.identity import Identity
from shardcast.errors import ManifestError
from shardcast.signed import Envelope, seal, unseal

# Domain separation: a manifest signature can never be replayed as another signed message.
DOMAIN = b"swarmrl/shardcast/manifest/v1\n"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
DEFAULT_SHARD_SIZE = 16 * 1024 * 1024
DEFAULT_PIECE_SIZE = 256 * 1024
MIN_PIECE_SIZE = 4096
PIECES_PER_VERSION = 128
"""What `piece_size_for` aims at: a version's payload in at least this many units (and
fewer than twice as many, unless pieces are at their smallest or largest)."""
AUTO = "auto"
MAX_REQUIRES = 4
"""Versions one version may require: a LoRA version needs one; a few leave room, not a list
that makes every holder keep the whole history."""
REQUIRES_FILE = ".shardcast-requires"
"""In a folder to publish: the versions it requires, as a JSON list (hidden, so it is tool
state rather than a file of the version)."""

Hash = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
Size = Annotated[int, msgspec.Meta(ge=0, le=2**50)]
# Relative POSIX paths without '..' or leading '/', so a manifest can never write outside the
# folder it is fetched into.
RelPath = Annotated[
    str,
    msgspec.Meta(
        min_length=1, max_length=512, pattern=r"^(?!\.\.?(/|$))(?!.*/\.\.?(/|$))[^/\x00][^\x00]*$"
    ),
]


# omit_defaults: a manifest without pieces encodes exactly as before pieces existed, so
# receivers that predate them still read it.
class _Struct(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, omit_defaults=True
):
    pass


class FileEntry(_Struct):
    path: RelPath
    size: Size
    hash: Hash


class PayloadFile(_Struct):
    name: RelPath
    """Name the payload file is served under (URL path below the version)."""
    target: RelPath
    """The file of `files` this payload produces."""
    encoding: Literal["raw", "xor-zstd", "xor-zlib"]
    """`xor-zstd` for new deltas; `xor-zlib` deltas (before zstd) still decode."""
    size: Size
    hash: Hash
    shards: list[Hash]
    """BLAKE3 of bytes [i * shard_size, (i + 1) * shard_size) of this payload file."""
    pieces: list[Hash] = []
    """BLAKE3 of bytes [i * piece_size, (i + 1) * piece_size); empty when the manifest has
    no `piece_size`."""


class Manifest(_Struct):
    pool_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    version: Annotated[int, msgspec.Meta(ge=0)]
    shard_size: Annotated[int, msgspec.Meta(ge=4096, le=2**31)]
    files: list[FileEntry]
    payload: list[PayloadFile]
    base: Annotated[int, msgspec.Meta(ge=0)] | None = None
    """For a delta: the version whose files the deltas apply to."""
    created: float = 0.0
    piece_size: Annotated[int, msgspec.Meta(ge=MIN_PIECE_SIZE, le=2**31)] | None = None
    """Pieces of this many bytes are the unit of transfer; None: the shard is."""
    requires: Annotated[
        list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=MAX_REQUIRES)
    ] = []
    """Older versions this one is unusable without (a LoRA adapter version's base)."""

    @property
    def unit(self) -> int:
        """Bytes per unit of transfer: a piece, or a shard in manifests without pieces."""
        return self.piece_size or self.shard_size

    @property
    def is_delta(self) -> bool:
        return self.base is not None

    @property
    def needs(self) -> list[int]:
        """The versions a holder must keep for this one to be rebuilt and used."""
        return ([] if self.base is None else [self.base]) + self.requires

    @property
    def payload_bytes(self) -> int:
        return sum(p.size for p in self.payload)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def kept(self) -> list[FileEntry]:
        """The files of a delta that are the base's unchanged (no payload: nothing to fetch)."""
        produced = {p.target for p in self.payload}
        return [f for f in self.files if f.path not in produced]

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise ManifestError(f"version {self.version} has no file {path!r}")

    def payload_file(self, name: str) -> PayloadFile:
        for p in self.payload:
            if p.name == name:
                return p
        raise ManifestError(f"version {self.version} has no payload file {name!r}")


SignedManifest = Envelope
"""The manifest as served: its msgpack body in the coordinator's signed envelope."""


_body_decoder = msgspec.msgpack.Decoder(Manifest)
_encoder = msgspec.msgpack.Encoder()


def check_consistent(m: Manifest) -> None:
    """Refuse a manifest whose parts contradict each other (a signed bug is still a bug)."""
    paths = [f.path for f in m.files]
    if len(set(paths)) != len(paths):
        raise ManifestError("manifest lists a file twice")
    names = [p.name for p in m.payload]
    if len(set(names)) != len(names):
        raise ManifestError("manifest lists a payload file twice")
    if m.piece_size is not None and m.shard_size % m.piece_size:
        raise ManifestError(f"piece size {m.piece_size} does not divide {m.shard_size}")
    targets = set(paths)
    for p in m.payload:
        if p.target not in targets:
            raise ManifestError(f"payload {p.name!r} targets unknown file {p.target!r}")
        want = max(1, -(-p.size // m.shard_size))
        if len(p.shards) != want:
            raise ManifestError(f"payload {p.name!r} has {len(p.shards)} shards, expected {want}")
        pieces = 0 if m.piece_size is None else max(1, -(-p.size // m.piece_size))
        if len(p.pieces) != pieces:
            raise ManifestError(f"payload {p.name!r} has {len(p.pieces)} pieces, expected {pieces}")
    produced = {p.target for p in m.payload}
    if len(produced) != len(m.payload):
        raise ManifestError("two payload files produce the same file")
    if m.base is None and produced != targets:
        raise ManifestError("some files of a full version have no payload")
    if m.base is None and any(p.encoding != "raw" for p in m.payload):
        raise ManifestError("a full version carries only raw payload")
    if m.base is not None and m.base >= m.version:
        raise ManifestError("a delta's base must be an earlier version")
    check_requires(m.version, m.requires)


def check_requires(version: int, requires: list[int]) -> None:
    """Refuse requirements a holder could not honour: too many, repeated, or not older than
    `version` (only older ones, so that requirements can never form a cycle)."""
    if len(requires) > MAX_REQUIRES:
        raise ManifestError(f"v{version} requires {len(requires)} versions, at most {MAX_REQUIRES}")
    if len(set(requires)) != len(requires):
        raise ManifestError(f"v{version} requires a version twice: {requires}")
    if any(not 0 <= r < version for r in requires):
        raise ManifestError(f"v{version} may require only earlier versions, not {requires}")


def with_requirements(versions: Iterable[int], needs: Callable[[int], Iterable[int]]) -> set[int]:
    """`versions` and, transitively, every version they need (`needs(v)`: v's own needs)."""
    out: set[int] = set()
    todo = list(versions)
    while todo:
        v = todo.pop()
        if v not in out:
            out.add(v)
            todo.extend(needs(v))
    return out


def declare_requires(folder: Path, versions: list[int]) -> None:
    """Record in a folder about to be published the versions it requires (`REQUIRES_FILE`)."""
    (Path(folder) / REQUIRES_FILE).write_bytes(msgspec.json.encode(sorted(versions)))


def declared_requires(folder: Path) -> list[int]:
    """The versions `folder` declares it requires; none without a `REQUIRES_FILE`."""
    path = Path(folder) / REQUIRES_FILE
    if not path.exists():
        return []
    try:
        return msgspec.json.decode(path.read_bytes(), type=list[int])
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        raise ManifestError(f"{path}: not a JSON list of versions: {e}") from None


def sign_manifest(m: Manifest, identity: Identity) -> bytes:
    """Encode and sign `m`; returns the bytes that are served as the version's manifest."""
    check_consistent(m)
    return seal(_encoder.encode(m), identity, DOMAIN)


def open_manifest(
    data: bytes, *, public_key: bytes, pool_id: str, version: int | None = None
) -> Manifest:
    """Check and decode served manifest bytes.

    Refuses (ManifestError) anything too large or malformed, signed by another key than the
    pool's coordinator, for another pool, or (if `version` is given) for another version.
    """
    m = unseal(
        data,
        public_key=public_key,
        pool_id=pool_id,
        domain=DOMAIN,
        max_bytes=MAX_MANIFEST_BYTES,
        body=_body_decoder,
        what="manifest",
        error=ManifestError,
    )
    if version is not None and m.version != version:
        raise ManifestError(f"asked for version {version}, got a manifest for {m.version}")
    check_consistent(m)
    return m


def shard_range(m: Manifest, p: PayloadFile, index: int) -> tuple[int, int]:
    """(offset, length) of shard `index` of payload file `p`."""
    start = index * m.shard_size
    return start, max(0, min(m.shard_size, p.size - start))


def units(m: Manifest, p: PayloadFile) -> list[str]:
    """The hashes of `p`'s units of transfer (its pieces, or its shards without pieces)."""
    return p.pieces if m.piece_size is not None else p.shards


def shard_index(m: Manifest) -> dict[str, int]:
    """Global index of each payload file's first unit (piece, or shard), as in bitfields."""
    out, n = {}, 0
    for p in m.payload:
        out[p.name] = n
        n += len(units(m, p))
    return out


def unit_range(m: Manifest, p: PayloadFile, index: int) -> tuple[int, int]:
    """(offset, length) of unit `index` of payload file `p`."""
    start = index * m.unit
    return start, max(0, min(m.unit, p.size - start))


def piece_size_for(payload_bytes: int, shard_size: int) -> int | None:
    """The piece size for a payload of `payload_bytes`: `DEFAULT_PIECE_SIZE` (256 KiB),
    doubled while the payload would still be at least `PIECES_PER_VERSION` pieces of the
    doubled size, up to half a shard; None (shards are the unit) when even the smallest is not
    smaller than a shard.

    A swarm's tail is the last units out of the origin reaching every member: each first
    lands at one member, which the others then all ask at once, so the tail takes a few
    units' time whatever the version's size, and more units make it a smaller part of the
    whole. But every unit also costs each member a request and each of its peers a bitfield
    answer, on CPU-bound Python servers, whatever its size. The thirty-first session measured
    both (docs/shardcast.md): 128 units beat 32 and 64 for a 32 MiB version (last member
    1.19x the bound on the median against 1.34x and 1.30x), and 2 MiB beat 4 MiB pieces for
    256 MiB at 8 members; 128 KiB pieces (256 units) were CPU-bound."""
    piece = DEFAULT_PIECE_SIZE
    if piece >= shard_size:
        return None
    while (
        payload_bytes >= PIECES_PER_VERSION * 2 * piece
        and 4 * piece <= shard_size
        and shard_size % (2 * piece) == 0
    ):
        piece *= 2
    return piece
