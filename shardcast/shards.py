"""Hashing files into shards: one read pass gives the file hash and every shard hash.

These functions block (disk and BLAKE3); async callers run them in a worker thread
(`trio.to_thread.run_sync`) so the event loop keeps serving.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import blake3

READ_CHUNK = 4 * 1024 * 1024


def hash_bytes(data: bytes | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


@dataclass(frozen=True)
class Hashed:
    size: int
    hash: str
    shards: list[str]
    pieces: list[str]
    """Empty unless a piece size was asked for."""


class _Grid:
    """BLAKE3 of consecutive `step`-byte parts of a stream fed in chunks that never cross
    a part boundary."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.hashes: list[str] = []
        self._h = blake3.blake3()
        self._n = 0

    def update(self, chunk: memoryview) -> None:
        self._h.update(chunk)
        self._n += len(chunk)
        if self._n == self.step:
            self._close()

    def finish(self) -> list[str]:
        if self._n or not self.hashes:
            self._close()
        return self.hashes

    def _close(self) -> None:
        self.hashes.append(self._h.hexdigest())
        self._h = blake3.blake3()
        self._n = 0


def hash_and_copy(
    src: Path, dst: Path | None, shard_size: int, piece_size: int | None = None
) -> Hashed:
    """Read `src` once: its size, file hash, shard hashes and (with `piece_size`, which must
    divide `shard_size`) piece hashes; copy it to `dst` if given.

    The copy makes the published bytes the origin's own, so a trainer that overwrites its
    checkpoint folder later cannot change what is being served under a signed hash.
    """
    whole = blake3.blake3()
    shards = _Grid(shard_size)
    pieces = _Grid(piece_size) if piece_size else None
    step = piece_size or shard_size  # reads never cross a piece (hence shard) boundary
    size = 0
    out = open(dst, "wb") if dst is not None else None  # noqa: SIM115 - closed below
    try:
        with open(src, "rb") as f:
            buf = bytearray(min(READ_CHUNK, step))
            view = memoryview(buf)
            while True:
                n = f.readinto(view[: min(len(buf), step - size % step)])
                if not n:
                    break
                chunk = view[:n]
                whole.update(chunk)
                shards.update(chunk)
                if pieces is not None:
                    pieces.update(chunk)
                if out is not None:
                    out.write(chunk)
                size += n
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    return Hashed(size, whole.hexdigest(), shards.finish(), pieces.finish() if pieces else [])


def hash_range(path: Path, offset: int, length: int) -> str:
    """BLAKE3 of `length` bytes of `path` at `offset` (short if the file is short)."""
    h = blake3.blake3()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(READ_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (no second copy on disk), or a copy where links fail."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def list_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the regular files under `folder`, sorted; hidden files skipped
    (they are tool state such as `.shardcast-manifest`, not part of a checkpoint)."""
    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            p = Path(root, name)
            if p.is_file() and not p.is_symlink():
                out.append(p.relative_to(folder).as_posix())
    return sorted(out)
