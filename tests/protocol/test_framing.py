"""Framing and the other decoders of the transport: exact round trips, and only `ProtocolError`
(never a crash or a hang) on random or mutated bytes.

Examples per property come from the suite's hypothesis profile (tests/conftest.py): `ci` by
default, `thorough` (10,000 each) with `HYPOTHESIS_PROFILE=thorough python -m pytest -k fuzz`.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from protocol import poolspec
from protocol.discovery import make_pool_record, open_pool_record
from protocol.envelope import seal
from protocol.errors import ProtocolError
from protocol.framing import (
    HEADER_BYTES,
    FrameDecoder,
    FrameTooLarge,
    encode_frame,
    parse_header,
    read_frame,
    read_frame_or_eof,
)
from protocol.host import ErrorReply, parse_multiaddr, peek_kind, public_key_of_peer
from protocol.identity import Identity

LIMIT = 1024


def chunked(data: bytes, cuts: list[int]):
    """A `receive(n)` over `data` that returns pieces no longer than the cuts allow."""
    pos = 0
    cuts = list(cuts)

    async def receive(n: int) -> bytes:
        nonlocal pos
        size = min(n, cuts.pop(0) if cuts else n)
        out = data[pos : pos + max(1, size)]
        pos += len(out)
        return out

    return receive


def run_now(coroutine):
    """Run a coroutine that never waits (our in-memory receive never does), without an event
    loop: thousands of examples stay fast, and a read that tried to wait would be a hang."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise AssertionError("the reader waited on an in-memory stream: it would hang")


def read_all_frames(data: bytes, cuts: list[int], limit: int = LIMIT) -> list[bytes]:
    """Every frame in `data`, read twice: with `read_frame` (a stream of exactly one frame at a
    time) and with `read_frame_or_eof` (a stream of many); both must agree."""

    async def with_read_frame() -> list[bytes]:
        receive = chunked(data, cuts)
        frames: list[bytes] = []
        # Each frame consumes at least its header, so this loop is bounded.
        for _ in range(len(data) // HEADER_BYTES + 1):
            try:
                frames.append(await read_frame(receive, limit))
            except ProtocolError as e:
                if "ended after 0 of" in str(e) and frames_consumed(frames) == len(data):
                    return frames
                raise
        raise AssertionError("more frames than the bytes allow")

    async def with_read_frame_or_eof() -> list[bytes]:
        receive = chunked(data, cuts)
        frames: list[bytes] = []
        for _ in range(len(data) // HEADER_BYTES + 1):
            frame = await read_frame_or_eof(receive, limit)
            if frame is None:
                return frames
            frames.append(frame)
        raise AssertionError("more frames than the bytes allow")

    try:
        first = run_now(with_read_frame())
    except ProtocolError:
        with pytest.raises(ProtocolError):
            run_now(with_read_frame_or_eof())
        raise
    assert run_now(with_read_frame_or_eof()) == first
    return first


def frames_consumed(frames: list[bytes]) -> int:
    return sum(HEADER_BYTES + len(f) for f in frames)


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """Flip, overwrite, delete, insert or truncate a few bytes of a valid input."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]))
        i = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[i] = draw(st.integers(0, 255))
        elif op == "delete" and out:
            del out[i : i + draw(st.integers(1, 8))]
        elif op == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del out[i:]
    return bytes(out)


# --------------------------------------------------------------------- exact behaviour


def test_encode_parse_round_trip_and_limits():
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert parse_header(b"\x00\x00\x00\x03", 3) == 3
    with pytest.raises(FrameTooLarge, match="refused unread"):
        parse_header(struct.pack(">I", 2**32 - 1), LIMIT)
    with pytest.raises(ProtocolError, match="header is 4 bytes"):
        parse_header(b"\x00\x01", LIMIT)


def test_read_frame_refuses_before_reading_the_body():
    asked: list[int] = []

    async def receive(n: int) -> bytes:
        asked.append(n)
        return struct.pack(">I", 10 * LIMIT)[:n]

    with pytest.raises(FrameTooLarge):
        trio.run(read_frame, receive, LIMIT)
    assert asked == [HEADER_BYTES]  # only the header was ever asked for


def test_decoder_keeps_nothing_after_a_refusal():
    decoder = FrameDecoder(8)
    with pytest.raises(FrameTooLarge):
        decoder.feed(struct.pack(">I", 9) + b"x" * 9)
    assert decoder.pending == 0
    decoder = FrameDecoder(8)
    assert decoder.feed(encode_frame(b"") + encode_frame(b"12345678")) == [b"", b"12345678"]
    decoder.feed(b"\x00\x00")
    with pytest.raises(ProtocolError, match="inside a frame"):
        decoder.close()


@given(st.lists(st.binary(max_size=LIMIT), max_size=8), st.lists(st.integers(1, 64)))
def test_fuzz_frames_survive_any_chunking(frames, cuts):
    stream = b"".join(encode_frame(f) for f in frames)
    assert read_all_frames(stream, cuts) == frames
    decoder = FrameDecoder(LIMIT)
    got: list[bytes] = []
    pos = 0
    for cut in [*cuts, len(stream)]:
        got += decoder.feed(stream[pos : pos + cut])
        pos += cut
    decoder.close()
    assert got == frames


# --------------------------------------------------------------------- fuzzing


@given(st.binary(max_size=4 * LIMIT), st.lists(st.integers(1, 64), max_size=16))
def test_fuzz_read_frame_random_bytes(data, cuts):
    try:
        frames = read_all_frames(data, cuts)
    except ProtocolError:
        return
    assert frames_consumed(frames) == len(data)


@given(st.data())
def test_fuzz_read_frame_mutated_frames(data):
    valid = b"".join(
        encode_frame(f) for f in data.draw(st.lists(st.binary(max_size=64), max_size=4))
    )
    cuts = data.draw(st.lists(st.integers(1, 16), max_size=8))
    with contextlib.suppress(ProtocolError):
        read_all_frames(data.draw(mutated(valid)), cuts, limit=64)


@given(st.lists(st.binary(max_size=2 * LIMIT), max_size=6))
def test_fuzz_frame_decoder_random_bytes_bounded(chunks):
    decoder = FrameDecoder(LIMIT)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            assert decoder.pending <= LIMIT + HEADER_BYTES
        decoder.close()
    except ProtocolError:
        pass


IDENTITY = Identity(bytes(range(32)))
SPEC = poolspec.from_dict(
    {"name": "fuzz", "coordinator": {"public_key": IDENTITY.public_key.hex()}}
)
POOL = poolspec.pool_id(SPEC)
RECORD = make_pool_record(IDENTITY, SPEC, ["/ip4/127.0.0.1/tcp/4001", "/ip4/10.0.0.1/tcp/4001"])
ERROR = seal(IDENTITY, POOL, ErrorReply(code="rate_limited", detail="slow down"))


@given(st.one_of(st.binary(max_size=4096), mutated(RECORD)))
def test_fuzz_pool_record(data):
    try:
        location = open_pool_record(data, POOL)
    except ProtocolError:
        return
    # Whatever got through is the coordinator's own record (a mutation that changed nothing).
    assert location.spec == SPEC and location.coordinator_peer_id == IDENTITY.peer_id()


@given(st.one_of(st.binary(max_size=512), mutated(ERROR)))
def test_fuzz_peek_kind(data):
    with contextlib.suppress(ProtocolError):
        assert isinstance(peek_kind(data, 4096), str)


@given(
    st.one_of(
        st.text(max_size=80),
        mutated(IDENTITY.peer_id().encode()).map(lambda b: b.decode("latin-1")),
    )
)
def test_fuzz_peer_id(text):
    try:
        key = public_key_of_peer(text)
    except ProtocolError:
        return
    assert len(key) == 32


@given(
    st.one_of(
        st.text(max_size=80),
        mutated(b"/ip4/127.0.0.1/tcp/4001").map(lambda b: b.decode("latin-1")),
    )
)
def test_fuzz_multiaddr(text):
    with contextlib.suppress(ProtocolError):
        parse_multiaddr(text)
