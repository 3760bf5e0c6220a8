"""zstd delta blocks: exact, bounded when decoding, and old zlib deltas still decode."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import blake3
import numpy as np
import pytest
import zstandard

from shardcast.delta import apply_delta, encode_delta
from shardcast.errors import DeltaError


def _bf16_pair(tmp_path: Path, n: int = 300_000, changed: float = 0.02) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    new = w.copy()
    idx = rng.choice(n, int(n * changed), replace=False)
    new[idx] ^= rng.integers(1, 8, len(idx), dtype=np.uint16)  # low mantissa bits move
    base, target = tmp_path / "base", tmp_path / "target"
    base.write_bytes(w.tobytes())
    target.write_bytes(new.tobytes())
    return base, target


@pytest.mark.parametrize("codec", ["zstd", "zlib"])
def test_both_codecs_rebuild_exactly(tmp_path: Path, codec: str) -> None:
    base, target = _bf16_pair(tmp_path)
    delta = tmp_path / "delta"
    size = encode_delta(base, target, delta, block_size=64 * 1024, codec=codec)
    assert size < target.stat().st_size * 0.2
    assert delta.read_bytes()[:4] == (b"SCX2" if codec == "zstd" else b"SCX1")
    got = apply_delta(base, delta, tmp_path / "out")
    assert got == blake3.blake3(target.read_bytes()).hexdigest()
    assert (tmp_path / "out").read_bytes() == target.read_bytes()


def _one_block_delta(path: Path, magic: bytes, mode: int, block: bytes, size: int) -> None:
    head = struct.pack("<4sQIIB", magic, size, size, 1, 1)
    path.write_bytes(head + struct.pack("<BI", mode, len(block)) + block)


@pytest.mark.parametrize("magic", [b"SCX2", b"SCX1"])
def test_block_decoding_to_more_than_its_size_is_refused(tmp_path: Path, magic: bytes) -> None:
    """A 4 KiB block that decompresses to 64 MiB (a "bomb") is refused, not expanded."""
    bomb_size = 64 << 20
    zeros = b"\0" * bomb_size
    if magic == b"SCX2":
        block = zstandard.ZstdCompressor(level=1).compress(zeros)
    else:
        block = zlib.compress(zeros, 9)
    base = tmp_path / "base"
    base.write_bytes(b"\0" * 4096)
    _one_block_delta(tmp_path / "bomb", magic, 1, block, 4096)
    with pytest.raises(DeltaError, match=r"4096|more than"):
        apply_delta(base, tmp_path / "bomb", tmp_path / "out")


def test_zstd_block_without_content_size_is_refused(tmp_path: Path) -> None:
    block = zstandard.ZstdCompressor(write_content_size=False).compress(b"\1" * 4096)
    base = tmp_path / "base"
    base.write_bytes(b"\0" * 4096)
    _one_block_delta(tmp_path / "d", b"SCX2", 1, block, 4096)
    with pytest.raises(DeltaError, match="declares"):
        apply_delta(base, tmp_path / "d", tmp_path / "out")


def test_unknown_magic_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.write_bytes(b"\0" * 4096)
    _one_block_delta(tmp_path / "d", b"SCX9", 0, b"", 4096)
    with pytest.raises(DeltaError, match="not an XOR delta"):
        apply_delta(base, tmp_path / "d", tmp_path / "out")
