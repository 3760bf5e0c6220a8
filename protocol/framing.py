"""Length-prefixed frames: a 4-byte big-endian length, then that many bytes.

The limit is checked on the header, before a single byte of the body is read or buffered, so a
peer that declares a 4 GiB frame costs us four bytes. The same framing carries requests and
responses on libp2p streams and on the plain TCP baseline of the benchmark.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

from protocol.errors import ProtocolError

HEADER_BYTES = 4
MAX_FRAME_BYTES = 2**32 - 1  # what the header can express
_HEADER = struct.Struct(">I")

# One read of at most this many bytes: big enough to amortise the per-read cost, small enough
# that a slow peer cannot make us hold more than we asked for.
READ_CHUNK = 256 * 1024

Receive = Callable[[int], Awaitable[bytes]]
"""`receive(n)` returns 1..n bytes, or b"" at the end of the stream."""


class FrameTooLarge(ProtocolError):
    """A frame header declared more bytes than the receiver accepts."""


def encode_frame(payload: bytes) -> bytes:
    """Prefix `payload` with its length."""
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"a frame holds at most {MAX_FRAME_BYTES} bytes, got {len(payload)}")
    return _HEADER.pack(len(payload)) + payload


def parse_header(header: bytes, max_bytes: int) -> int:
    """The body length a header declares, refused when it exceeds `max_bytes`."""
    if len(header) != HEADER_BYTES:
        raise ProtocolError(f"a frame header is {HEADER_BYTES} bytes, got {len(header)}")
    (length,) = _HEADER.unpack(header)
    if length > max_bytes:
        raise FrameTooLarge(
            f"frame of {length} bytes exceeds the {max_bytes}-byte limit; refused unread"
        )
    return length


async def read_exactly(receive: Receive, n: int) -> bytes:
    """Read exactly `n` bytes; a stream that ends early is a `ProtocolError`."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = await receive(min(n - got, READ_CHUNK))
        if not chunk:
            raise ProtocolError(f"stream ended after {got} of {n} bytes")
        if len(chunk) > n - got:
            # A receive that over-delivers would silently eat the next frame's bytes.
            raise ProtocolError(f"transport returned {len(chunk)} bytes for a {n - got}-byte read")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def read_frame(receive: Receive, max_bytes: int) -> bytes:
    """Read one frame whose body is at most `max_bytes`; the body is returned."""
    length = parse_header(await read_exactly(receive, HEADER_BYTES), max_bytes)
    return await read_exactly(receive, length)


async def read_frame_or_eof(receive: Receive, max_bytes: int) -> bytes | None:
    """Like `read_frame`, but a stream that ends cleanly before the frame starts gives None.

    That is how a stream carrying many frames ends; ending anywhere else is a `ProtocolError`.
    """
    first = await receive(HEADER_BYTES)
    if not first:
        return None
    if len(first) > HEADER_BYTES:
        raise ProtocolError(f"transport returned {len(first)} bytes for a {HEADER_BYTES}-byte read")
    header = first + await read_exactly(receive, HEADER_BYTES - len(first))
    return await read_exactly(receive, parse_header(header, max_bytes))


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get whole frames back.

    Holds at most one partial frame, and never more than `max_bytes + HEADER_BYTES` of it, so a
    peer cannot grow its buffer past the limit.
    """

    def __init__(self, max_bytes: int) -> None:
        if not 0 <= max_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_bytes must be in [0, {MAX_FRAME_BYTES}], got {max_bytes}")
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._need: int | None = None  # body length of the frame being read, once known

    def feed(self, data: bytes) -> list[bytes]:
        """Add `data`; return every frame now complete, in order."""
        self._buffer += data
        frames: list[bytes] = []
        while True:
            if self._need is None:
                if len(self._buffer) < HEADER_BYTES:
                    return frames
                try:
                    self._need = parse_header(bytes(self._buffer[:HEADER_BYTES]), self.max_bytes)
                except ProtocolError:
                    self._buffer.clear()  # a refused stream is dead; keep nothing of it
                    raise
                del self._buffer[:HEADER_BYTES]
            if len(self._buffer) < self._need:
                return frames
            frames.append(bytes(self._buffer[: self._need]))
            del self._buffer[: self._need]
            self._need = None

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buffer) + (HEADER_BYTES if self._need is not None else 0)

    def close(self) -> None:
        """Declare the end of the stream: a partial frame left over is a `ProtocolError`."""
        if self.pending:
            raise ProtocolError(f"stream ended inside a frame ({self.pending} bytes left over)")
