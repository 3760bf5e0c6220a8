"""Hashing files into shards: one read pass gives the file hash and every shard hash.

These functions block (disk and BLAKE3); async callers run them in a worker thread
(`trio.to_thread.run_sync`) so the event loop keeps serving.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3

READ_CHUNK = 4 * 1024 * 1024


def hash_bytes(data: bytes | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


def hash_and_copy(src: Path, dst: Path | None, shard_size: int) -> tuple[int, str, list[str]]:
    """Read `src` once: return (size, file hash, shard hashes); copy it to `dst` if given.

    The copy makes the published bytes the origin's own, so a trainer that overwrites its
    checkpoint folder later cannot change what is being served under a signed hash.
    """
    whole = blake3.blake3()
    shard_hashes: list[str] = []
    shard = blake3.blake3()
    in_shard = 0
    size = 0
    out = open(dst, "wb") if dst is not None else None  # noqa: SIM115 - closed below
    try:
        with open(src, "rb") as f:
            buf = bytearray(min(READ_CHUNK, shard_size))
            view = memoryview(buf)
            while True:
                n = f.readinto(view[: min(len(buf), shard_size - in_shard)])
                if not n:
                    break
                chunk = view[:n]
                whole.update(chunk)
                shard.update(chunk)
                if out is not None:
                    out.write(chunk)
                size += n
                in_shard += n
                if in_shard == shard_size:
                    shard_hashes.append(shard.hexdigest())
                    shard = blake3.blake3()
                    in_shard = 0
        if in_shard or not shard_hashes:
            shard_hashes.append(shard.hexdigest())
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    return size, whole.hexdigest(), shard_hashes


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
