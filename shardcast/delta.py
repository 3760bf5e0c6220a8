"""The XOR delta: a file as the XOR of its bytes with the base version's file.

Between consecutive RL steps most bf16 weights are bit-identical, so the XOR of the two files
is mostly zero. It is cut into blocks and each block is stored in whichever form is smallest:

- zero:   nothing (the block did not change),
- dense:  the compressed XOR with its bytes regrouped by position inside each element (all
          first bytes, then all second bytes, ...: "byte shuffle"), which puts the rarely
          changing high bytes of bf16/fp32 values together as long zero runs,
- sparse: the compressed changed elements' positions (gaps, u32) and their XOR values (both
          byte-shuffled): the index/value form, best when few elements changed.

Blocks are compressed with zstd level 1 (`xor-zstd`, magic SCX2): on bf16 XOR deltas it is
both smaller and several times faster than zlib level 1 (measured in docs/shardcast.md).
Deltas from before it (`xor-zlib`, magic SCX1) still decode. Blocks are
independent, so coding streams through both files with bounded memory, and every block's
decoded size is known before it is decoded: a block that would decode to more is refused
rather than allowed to fill memory.

Layout (little endian):
    magic  b"SCX2" (zstd blocks) or b"SCX1" (zlib blocks)
    u64    target size
    u32    block size (a multiple of the element width)
    u32    number of blocks n = ceil(target size / block size)
    u8     element width w (1, 2 or 4 bytes), chosen by the encoder
    n x (u8 mode, u32 length)   mode 0 zero, 1 dense, 2 sparse; length of the stored block
    ...    the stored blocks, in order
    sparse block = compress(u32 count | shuffle(u32 gaps) | shuffle(values, w))

Byte i of the target is base[i] XOR x[i], where base bytes past the base file's end count as
zero, so the files need not have the same size. Reconstruction is exact; the caller checks the
rebuilt file against the hash in the signed manifest.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import blake3
import numpy as np
import zstandard

from shardcast.errors import DeltaError

Codec = Literal["zstd", "zlib"]
MAGICS: dict[bytes, Codec] = {b"SCX2": "zstd", b"SCX1": "zlib"}
ENCODINGS: dict[Codec, str] = {"zstd": "xor-zstd", "zlib": "xor-zlib"}
DEFAULT_BLOCK = 1024 * 1024
_HEAD = struct.Struct("<4sQIIB")
_ENTRY = struct.Struct("<BI")
ZERO, DENSE, SPARSE = 0, 1, 2
WIDTHS = (1, 2, 4)
# Level 1 for dense blocks: several times faster than the default on noisy weight bytes for
# a few percent of size. Sparse blocks are small, so they afford a better level.
DENSE_LEVEL = {"zstd": 1, "zlib": 1}
SPARSE_LEVEL = {"zstd": 9, "zlib": 6}


def _compressor(codec: Codec, level: int) -> Callable[[bytes], bytes]:
    if codec == "zlib":
        return lambda data: zlib.compress(data, level)
    # The content size in every frame header is what lets the decoder bound its output.
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress


def _decompress(codec: Codec, data: bytes, limit: int, i: int) -> bytes:
    """Decode one block, refusing to produce more than `limit` bytes."""
    if codec == "zlib":
        d = zlib.decompressobj()
        try:
            out = d.decompress(data, limit)
        except zlib.error as e:
            raise DeltaError(f"block {i} does not decompress: {e}") from None
        if d.unconsumed_tail or not d.eof or d.unused_data:
            raise DeltaError(f"block {i} decodes to more than {limit} bytes or is malformed")
        return out
    # zstd trusts the header's content size over max_output_size, so check it first.
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise DeltaError(f"block {i} is not a zstd frame: {e}") from None
    if size < 0 or size > limit:
        raise DeltaError(f"block {i} declares {size} bytes; at most {limit} allowed")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise DeltaError(f"block {i} does not decompress: {e}") from None
    if len(out) != size:
        raise DeltaError(f"block {i} decoded to {len(out)} bytes, its header says {size}")
    return out


def _read_block(f, n: int) -> np.ndarray:
    data = f.read(n)
    arr = np.zeros(n, dtype=np.uint8)
    arr[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return arr


def _shuffle(x: np.ndarray, w: int) -> bytes:
    cut = len(x) - len(x) % w
    return x[:cut].reshape(-1, w).T.tobytes() + x[cut:].tobytes()


def _unshuffle(data: bytes, w: int, n: int) -> np.ndarray:
    x = np.frombuffer(data, dtype=np.uint8)
    cut = n - n % w
    out = np.empty(n, dtype=np.uint8)
    out[:cut] = x[:cut].reshape(w, -1).T.reshape(-1)
    out[cut:] = x[cut:]
    return out


class _Coder:
    def __init__(self, codec: Codec) -> None:
        self.dense = _compressor(codec, DENSE_LEVEL[codec])
        self.sparse = _compressor(codec, SPARSE_LEVEL[codec])


def _dense(x: np.ndarray, w: int, coder: _Coder) -> bytes:
    return coder.dense(_shuffle(x, w))


def _sparse(x: np.ndarray, w: int, coder: _Coder) -> bytes | None:
    if len(x) % w:
        return None
    elems = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[w])
    idx = np.flatnonzero(elems)
    gaps = np.diff(idx, prepend=0).astype(np.uint32)
    vals = elems[idx]
    raw = (
        struct.pack("<I", len(idx))
        + _shuffle(gaps.view(np.uint8), 4)
        + _shuffle(vals.view(np.uint8), w)
    )
    return coder.sparse(raw)


def _encode_block(x: np.ndarray, w: int, coder: _Coder) -> tuple[int, bytes]:
    if not x.any():
        return ZERO, b""
    dense = _dense(x, w, coder)
    # Index/value pairs pay only when under ~1/4 of the elements changed; skip the attempt
    # otherwise (it would cost more time than it could save).
    nonzero = np.count_nonzero(x) / max(1, len(x))
    sparse = _sparse(x, w, coder) if nonzero < 0.25 else None
    if sparse is not None and len(sparse) < len(dense):
        return SPARSE, sparse
    return DENSE, dense


def _choose_width(fb, ft, size: int, block: int, coder: _Coder) -> int:
    """The element width whose dense coding of the first changed block is smallest."""
    for i in range(-(-size // block)):
        want = min(block, size - i * block)
        x = np.bitwise_xor(_read_block(fb, want), _read_block(ft, want))
        if x.any():
            return min(WIDTHS, key=lambda w: len(_dense(x, w, coder)))
    return 1


def encode_delta(
    base: Path,
    target: Path,
    out: Path,
    block_size: int = DEFAULT_BLOCK,
    codec: Codec = "zstd",
) -> int:
    """Write the delta turning `base` into `target` to `out`; return its size in bytes.
    Its manifest encoding is `ENCODINGS[codec]`."""
    if block_size % 4:
        raise ValueError("block size must be a multiple of 4")
    coder = _Coder(codec)
    magic = next(m for m, c in MAGICS.items() if c == codec)
    size = Path(target).stat().st_size
    n = -(-size // block_size)
    with open(base, "rb") as fb, open(target, "rb") as ft, open(out, "wb") as fo:
        w = _choose_width(fb, ft, size, block_size, coder)
        fb.seek(0)
        ft.seek(0)
        fo.write(_HEAD.pack(magic, size, block_size, n, w))
        fo.write(b"\0" * _ENTRY.size * n)  # the block table, filled in once blocks are known
        table = []
        for i in range(n):
            want = min(block_size, size - i * block_size)
            x = np.bitwise_xor(_read_block(fb, want), _read_block(ft, want))
            mode, data = _encode_block(x, w, coder)
            table.append(_ENTRY.pack(mode, len(data)))
            fo.write(data)
        fo.seek(_HEAD.size)
        fo.write(b"".join(table))
        fo.seek(0, 2)
        return fo.tell()


def _decode_block(codec: Codec, mode: int, data: bytes, w: int, want: int, i: int) -> np.ndarray:
    # A sparse block holds at most one (gap, value) pair per element.
    limit = want if mode == DENSE else 4 + (want // w) * (4 + w)
    raw = _decompress(codec, data, limit, i)
    if mode == DENSE:
        if len(raw) != want:
            raise DeltaError(f"block {i} is {len(raw)} bytes, not {want}")
        return _unshuffle(raw, w, want)
    if len(raw) < 4:
        raise DeltaError(f"sparse block {i} is truncated")
    (count,) = struct.unpack_from("<I", raw)
    if len(raw) != 4 + count * (4 + w) or want % w:
        raise DeltaError(f"sparse block {i} has the wrong length")
    gaps = _unshuffle(raw[4 : 4 + 4 * count], 4, 4 * count).view(np.uint32)
    vals = _unshuffle(raw[4 + 4 * count :], w, w * count)
    idx = np.cumsum(gaps, dtype=np.uint64)
    if count and idx[-1] >= want // w:
        raise DeltaError(f"sparse block {i} points past its end")
    x = np.zeros(want // w, dtype={1: np.uint8, 2: np.uint16, 4: np.uint32}[w])
    x[idx] = vals.view(x.dtype)
    return x.view(np.uint8)


def apply_delta(base: Path, delta: Path, out: Path) -> str:
    """Rebuild the target from `base` and `delta` into `out`; return the BLAKE3 of `out`.

    Raises DeltaError for a malformed delta (the payload was hashed, so this means the
    publisher wrote garbage, not that a relay did).
    """
    h = blake3.blake3()
    with open(delta, "rb") as fd, open(base, "rb") as fb, open(out, "wb") as fo:
        head = fd.read(_HEAD.size)
        if len(head) != _HEAD.size:
            raise DeltaError(f"{delta} is too short to be a delta")
        magic, size, block, n, w = _HEAD.unpack(head)
        codec = MAGICS.get(magic)
        if codec is None or block <= 0 or w not in WIDTHS or block % w or n != -(-size // block):
            raise DeltaError(f"{delta} is not an XOR delta")
        table = fd.read(_ENTRY.size * n)
        if len(table) != _ENTRY.size * n:
            raise DeltaError(f"{delta} has a truncated block table")
        for i in range(n):
            mode, length = _ENTRY.unpack_from(table, i * _ENTRY.size)
            want = min(block, size - i * block)
            b = _read_block(fb, want)
            if mode not in (ZERO, DENSE, SPARSE) or (mode == ZERO) != (length == 0):
                raise DeltaError(f"{delta}: block {i} has a bad table entry")
            if mode != ZERO:
                data = fd.read(length)
                if len(data) != length:
                    raise DeltaError(f"{delta}: block {i} is truncated")
                b = np.bitwise_xor(b, _decode_block(codec, mode, data, w, want, i))
            data = b.tobytes()
            h.update(data)
            fo.write(data)
        if fd.read(1):
            raise DeltaError(f"{delta} has trailing bytes")
    return h.hexdigest()
