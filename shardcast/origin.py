"""The origin: turns checkpoint folders into signed versions and serves them.

`publish` copies the folder into the store while hashing it (one read pass, in a worker
thread), writes the payload (the files themselves, or XOR deltas against the previous
version), signs the manifest with the coordinator's key and makes the version servable. The
event loop is never blocked, so the origin keeps serving while it publishes. Versions are
published in order, one at a time.

The origin keeps the final files of its newest version in `tip-v{N}/` as the base of the next
delta; full versions hardlink their payload to those files rather than storing them twice.

A version's signed manifest names the versions it `requires` (a LoRA adapter version: its
base), given to `publish` or declared by the folder itself (`REQUIRES_FILE`, which the
trainer writes); the store retains them as long as a kept version requires them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import msgspec
import trio

from protocol.identity import Identity
from shardcast.delta import ENCODINGS, encode_delta
from shardcast.errors import ShardcastError
from shardcast.limits import ServeLimits
from shardcast.manifest import (
    AUTO,
    DEFAULT_PIECE_SIZE,
    DEFAULT_SHARD_SIZE,
    MIN_PIECE_SIZE,
    FileEntry,
    Manifest,
    PayloadFile,
    check_requires,
    declared_requires,
    open_manifest,
    piece_size_for,
    sign_manifest,
)
from shardcast.peerlist import DEFAULT_TTL, PeerListHolder, sign_peer_list
from shardcast.peers import PeerTable
from shardcast.server import create_app, serve_app
from shardcast.shards import hash_and_copy, link_or_copy, list_files
from shardcast.store import DEFAULT_KEEP, StoredVersion, VersionStore
from shardcast.throttle import UploadThrottle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Base:
    """The version a delta is taken against: its number, its files (the tip folder) and
    each file's hash, from its manifest."""

    version: int
    folder: Path
    hashes: dict[str, str]


class Origin:
    def __init__(
        self,
        root: Path,
        identity: Identity,
        pool_id: str,
        *,
        keep: int = DEFAULT_KEEP,
        shard_size: int = DEFAULT_SHARD_SIZE,
        piece_size: int | Literal["auto"] | None = AUTO,
        full_every: int = 10,
        rate: float | None = None,
        limits: ServeLimits | None = None,
    ) -> None:
        if keep < 2:
            raise ValueError("keep at least 2 versions (max staleness + 2)")
        self.identity = identity
        self.pool_id = pool_id
        self.shard_size = shard_size
        self.auto_pieces = piece_size == AUTO
        """Pieces sized per version by its payload (`piece_size_for`), else `piece_size`."""
        self.piece_size = piece_grid(
            shard_size, DEFAULT_PIECE_SIZE if piece_size == AUTO else piece_size
        )
        self.full_every = max(1, full_every)
        self.store = VersionStore(root, keep)
        self.store.load_existing(identity.public_key, pool_id)
        self.bucket = UploadThrottle(rate) if rate else None
        # The origin keeps a peer table too: it is where most nodes first hear of each other.
        self.peers = PeerTable(pool_id)
        self.peer_list = PeerListHolder(identity.public_key, pool_id)
        self.app = create_app(
            self.store, self.bucket, limits=limits, peers=self.peers, peer_list=self.peer_list
        )
        self.url: str | None = None
        self._lock = trio.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._tip: tuple[int, Path] | None = self._find_tip()

    @property
    def root(self) -> Path:
        return self.store.root

    def _find_tip(self) -> tuple[int, Path] | None:
        latest = self.store.latest()
        tip = self.root / f"tip-v{latest}"
        for d in self.root.glob("tip-v*"):
            if d != tip:
                shutil.rmtree(d, ignore_errors=True)
        return (latest, tip) if latest is not None and tip.is_dir() else None

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the store over HTTP until cancelled; `task_status` gets the URL."""

        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.url = await nursery.start(serve_app, self.app, host, port)
            task_status.started(self.url)

    def publish_from_thread(
        self, folder: Path, version: int, *, delta: bool = True, requires: list[int] | None = None
    ) -> Manifest:
        """`publish` for a synchronous caller (a trainer loop in its own thread): runs on the
        origin's event loop, which keeps serving, and returns once the version is live."""
        return trio.from_thread.run(
            partial(self.publish, folder, version, delta=delta, requires=requires),
            trio_token=self._token,
        )

    async def follow_disk(self, interval: float = 0.25) -> None:
        """Adopt versions another process (`shardcast publish`) adds to the store, and forget
        those it prunes; runs until cancelled. A cheap stat of the root per tick."""
        last = None
        while True:
            stamp = self.root.stat().st_mtime_ns
            if stamp != last:
                last = stamp
                await self._rescan()
            await trio.sleep(interval)

    async def _rescan(self) -> None:
        on_disk = {
            int(d.name[1:]): d
            for d in self.root.glob("v*")
            if d.name[1:].isdigit() and (d / "complete").exists()
        }
        for v in [v for v in self.store.versions if v not in on_disk]:
            await self.store.drop(v)
        for v in sorted(set(on_disk) - set(self.store.versions)):
            try:
                data = await trio.to_thread.run_sync((on_disk[v] / "manifest").read_bytes)
                m = open_manifest(
                    data, public_key=self.identity.public_key, pool_id=self.pool_id, version=v
                )
            except (OSError, ShardcastError) as e:
                log.warning("ignoring %s: %s", on_disk[v], e)
                continue
            self.store.add(StoredVersion(m, data, on_disk[v], complete=True))

    def _next_is_full(self, version: int, delta: bool) -> bool:
        if not delta or self._tip is None or self._tip[0] >= version:
            return True
        # Count back to the last full version: deltas beyond `full_every - 1` in a row would
        # make late joiners replay a long chain.
        steps, v = 0, self._tip[0]
        while v is not None:
            sv = self.store.versions.get(v)
            if sv is None:
                return True  # the chain is broken: the base is gone
            steps += 1
            if sv.manifest.base is None:
                break
            v = sv.manifest.base
        return steps >= self.full_every

    def publish_peers(self, urls: list[str], ttl: float = DEFAULT_TTL) -> bytes:
        """Sign `urls` (the relays and nodes the coordinator checked) as the pool's peer list
        and serve it on `/peerlist`; returns the signed bytes (for a join reply, say).
        `seq` is the clock in ns, so lists signed after a restart still supersede older
        ones."""
        data = sign_peer_list(self.identity, self.pool_id, urls, time.time_ns(), ttl)
        self.peer_list.offer(data)  # the receivers' own check: never serve what they refuse
        return data

    async def publish(
        self, folder: Path, version: int, *, delta: bool = True, requires: list[int] | None = None
    ) -> Manifest:
        """Publish `folder` as `version` (newer than any published one); returns its manifest.

        With `delta`, the version is a delta against the previous one unless `full_every`
        says it is time for a full one, or there is no previous version to diff against.
        `requires` (None: what the folder declares) must name versions this origin holds.
        """
        folder = Path(folder)
        async with self._lock:
            latest = self.store.latest()
            if latest is not None and version <= latest:
                raise ShardcastError(f"version {version} is not newer than {latest}")
            if not folder.is_dir():
                raise ShardcastError(f"{folder} is not a folder")
            if requires is None:
                requires = declared_requires(folder)
            self._check_held(version, requires)
            full = self._next_is_full(version, delta)
            base = None if full else self._base()
            t0 = time.perf_counter()
            m, data = await trio.to_thread.run_sync(
                self._build_locked, folder, version, base, requires
            )
            log.info(
                "published v%d (%s, %.1f MB payload of %.1f MB) in %.2fs",
                version,
                "full" if base is None else f"delta on v{base.version}",
                m.payload_bytes / 1e6,
                m.total_bytes / 1e6,
                time.perf_counter() - t0,
            )
            sv = StoredVersion(m, data, self.store.folder(version), complete=True)
            self.store.add(sv)
            old_tip = self._tip
            self._tip = (version, self.root / f"tip-v{version}")
            if old_tip is not None:
                await trio.to_thread.run_sync(shutil.rmtree, old_tip[1], True)
            await self.store.prune()
            return m

    def _base(self) -> _Base | None:
        """The tip as the base of a delta; None when there is no tip."""
        if self._tip is None:
            return None
        version, folder = self._tip
        held = self.store.get(version)
        hashes = {} if held is None else {f.path: f.hash for f in held.manifest.files}
        return _Base(version, folder, hashes)

    def _check_held(self, version: int, requires: list[int]) -> None:
        """Refuse to publish a version nobody could use: one that requires a version this
        origin no longer holds."""
        check_requires(version, requires)
        missing = [r for r in requires if self.store.get(r) is None]
        if missing:
            raise ShardcastError(f"v{version} requires {missing}, which this origin does not hold")

    def _delta_payload(
        self, base_file: Path, new_file: Path, out_dir: Path, name: str, size: int
    ) -> PayloadFile | None:
        """Write `name`'s XOR delta; None (and no file) when it is no smaller than the file
        itself, e.g. when every fp32 weight changed."""
        pname = name + ".xor"
        out = out_dir / pname
        out.parent.mkdir(parents=True, exist_ok=True)
        encode_delta(base_file, new_file, out, codec="zstd")
        h = hash_and_copy(out, None, self.shard_size, self.piece_size)
        if h.size >= size:
            out.unlink()
            return None
        return PayloadFile(
            name=pname,
            target=name,
            encoding=ENCODINGS["zstd"],
            size=h.size,
            hash=h.hash,
            shards=h.shards,
            pieces=h.pieces,
        )

    def _build_locked(
        self, folder: Path, version: int, base: _Base | None, requires: list[int]
    ) -> tuple[Manifest, bytes]:
        # Another process (a second `shardcast publish`) may share this store.
        with open(self.root / ".publish.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.store.folder(version).exists():
                raise ShardcastError(f"version {version} already exists in {self.root}")
            return self._build(folder, version, base, requires)

    def _build(
        self, folder: Path, version: int, base: _Base | None, requires: list[int]
    ) -> tuple[Manifest, bytes]:
        """Blocking: copy + hash the files, write the payload and signed manifest. A delta
        carries no payload for a file that `base` holds unchanged: receivers take it from
        their copy of the base. On the tiny preset that left 3 units of 9 to fetch per
        version, and each unit is a round trip in the version's path to the nodes."""
        names = list_files(folder)
        if not names:
            raise ShardcastError(f"{folder} has no files to publish")
        tip = self.root / f".tip-v{version}.tmp"
        vdir = self.root / f".v{version}.tmp"
        for d in (tip, vdir):
            shutil.rmtree(d, ignore_errors=True)
        # made here, not by the first payload file: a delta of a version identical to its
        # base (a restart publishing the weights it resumed from) has no payload at all
        vdir.mkdir(parents=True)
        files: list[FileEntry] = []
        payload: list[PayloadFile] = []
        for name in names:
            dst = tip / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            h = hash_and_copy(folder / name, dst, self.shard_size, self.piece_size)
            files.append(FileEntry(path=name, size=h.size, hash=h.hash))
            if base is not None and base.hashes.get(name) == h.hash:
                continue
            base_file = base.folder / name if base is not None else None
            delta_entry = None
            if base_file is not None and base_file.is_file():
                delta_entry = self._delta_payload(base_file, dst, vdir / "payload", name, h.size)
            if delta_entry is not None:
                payload.append(delta_entry)
            else:
                link_or_copy(dst, vdir / "payload" / name)
                payload.append(
                    PayloadFile(
                        name=name,
                        target=name,
                        encoding="raw",
                        size=h.size,
                        hash=h.hash,
                        shards=h.shards,
                        pieces=h.pieces,
                    )
                )
        piece_size, payload = self._sized_pieces(vdir / "payload", payload)
        m = Manifest(
            pool_id=self.pool_id,
            version=version,
            shard_size=self.shard_size,
            files=files,
            payload=payload,
            base=base.version if base is not None else None,
            created=time.time(),
            piece_size=piece_size,
            requires=sorted(requires),
        )
        data = sign_manifest(m, self.identity)
        # Round-trip through the receivers' own check: never serve what clients would refuse.
        open_manifest(data, public_key=self.identity.public_key, pool_id=self.pool_id)
        (vdir / "manifest").write_bytes(data)
        (vdir / "complete").touch()
        os.rename(vdir, self.store.folder(version))
        os.rename(tip, self.root / f"tip-v{version}")
        return m, data

    def _sized_pieces(
        self, folder: Path, payload: list[PayloadFile]
    ) -> tuple[int | None, list[PayloadFile]]:
        """The version's piece size, and its payload with piece hashes of that size.

        The payload was hashed in `self.piece_size` pieces; whether it is a delta or whole
        files, and so its size, is known only then. With `auto_pieces` a large payload is
        hashed again in larger pieces (`piece_size_for`): a second read of each file, about
        0.2 s for 256 MiB, paid only by versions of 64 MiB or more."""
        if not self.auto_pieces:
            return self.piece_size, payload
        size = piece_size_for(sum(p.size for p in payload), self.shard_size)
        if size == self.piece_size:
            return size, payload
        return size, [
            msgspec.structs.replace(
                p, pieces=hash_and_copy(folder / p.name, None, self.shard_size, size).pieces
            )
            for p in payload
        ]


def piece_grid(shard_size: int, piece_size: int | None) -> int | None:
    """The piece size a manifest gets: None (shards are the unit) when pieces would not be
    smaller than shards; refuses a size that does not divide the shard size."""
    if piece_size is None or piece_size >= shard_size:
        return None
    if piece_size < MIN_PIECE_SIZE or shard_size % piece_size:
        raise ShardcastError(
            f"piece size {piece_size} must be at least {MIN_PIECE_SIZE} and divide {shard_size}"
        )
    return piece_size
