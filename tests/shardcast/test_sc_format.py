"""Manifest signing and checks, shard hashing, and the XOR delta format."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.identity import Identity
from shardcast.delta import apply_delta, encode_delta
from shardcast.errors import DeltaError, ManifestError
from shardcast.manifest import (
    FileEntry,
    Manifest,
    PayloadFile,
    SignedManifest,
    open_manifest,
    sign_manifest,
    unit_range,
    units,
)
from shardcast.shards import hash_and_copy, list_files

H = "ab" * 32


def manifest(**kw) -> Manifest:
    fields = dict(
        pool_id="p",
        version=3,
        shard_size=4096,
        files=[FileEntry(path="a/model.bin", size=5000, hash=H)],
        payload=[
            PayloadFile(
                name="a/model.bin",
                target="a/model.bin",
                encoding="raw",
                size=5000,
                hash=H,
                shards=[H, H],
            )
        ],
    )
    fields.update(kw)
    return Manifest(**fields)


def test_signed_manifest_round_trips(identity: Identity) -> None:
    data = sign_manifest(manifest(), identity)
    m = open_manifest(data, public_key=identity.public_key, pool_id="p", version=3)
    assert m == manifest()


def test_manifest_for_another_pool_is_refused(identity: Identity) -> None:
    data = sign_manifest(manifest(pool_id="other"), identity)
    with pytest.raises(ManifestError, match="for pool 'other'"):
        open_manifest(data, public_key=identity.public_key, pool_id="p")


def test_manifest_signed_by_another_key_is_refused(identity: Identity) -> None:
    data = sign_manifest(manifest(), Identity.generate())
    with pytest.raises(ManifestError, match="not by the pool's coordinator"):
        open_manifest(data, public_key=identity.public_key, pool_id="p")


def test_manifest_with_bad_signature_is_refused(identity: Identity) -> None:
    signed = msgspec.msgpack.decode(sign_manifest(manifest(), identity), type=SignedManifest)
    body = msgspec.msgpack.encode(manifest(version=4))  # a relay bumps the version
    forged = msgspec.msgpack.encode(
        SignedManifest(body=body, public_key=signed.public_key, signature=signed.signature)
    )
    with pytest.raises(ManifestError, match="signature does not verify"):
        open_manifest(forged, public_key=identity.public_key, pool_id="p")


def test_manifest_for_another_version_is_refused(identity: Identity) -> None:
    data = sign_manifest(manifest(), identity)
    with pytest.raises(ManifestError, match="asked for version 2"):
        open_manifest(data, public_key=identity.public_key, pool_id="p", version=2)


@pytest.mark.parametrize("data", [b"", b"\x00" * 10, os.urandom(300), b"\x93\x01\x02\x03"])
def test_garbage_manifest_is_refused(identity: Identity, data: bytes) -> None:
    with pytest.raises(ManifestError):
        open_manifest(data, public_key=identity.public_key, pool_id="p")


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../x", "./a", "a/./b", "a\x00b"])
def test_manifest_paths_cannot_escape_the_folder(identity: Identity, path: str) -> None:
    m = manifest(
        files=[FileEntry(path=path, size=1, hash=H)],
        payload=[PayloadFile(name=path, target=path, encoding="raw", size=1, hash=H, shards=[H])],
    )
    body = msgspec.msgpack.encode(m)
    data = msgspec.msgpack.encode(
        SignedManifest(
            body=body,
            public_key=identity.public_key,
            signature=identity.sign(b"swarmrl/shardcast/manifest/v1\n" + body),
        )
    )
    with pytest.raises(ManifestError, match="malformed"):
        open_manifest(data, public_key=identity.public_key, pool_id="p")


def test_inconsistent_manifest_is_refused(identity: Identity) -> None:
    bad = manifest(
        payload=[
            PayloadFile(
                name="a/model.bin",
                target="a/model.bin",
                encoding="raw",
                size=5000,
                hash=H,
                shards=[H],  # 5000 bytes at 4096 per shard need two
            )
        ]
    )
    with pytest.raises(ManifestError, match="expected 2"):
        sign_manifest(bad, identity)


def test_only_a_delta_may_leave_a_file_without_payload(identity: Identity) -> None:
    """A file with no payload is kept from the base: fine in a delta, refused in a full
    version (nothing could produce it), and two payloads may not produce one file."""
    kept = FileEntry(path="tokenizer.json", size=2, hash=H)
    full = manifest(files=[*manifest().files, kept])
    with pytest.raises(ManifestError, match="no payload"):
        sign_manifest(full, identity)
    delta = manifest(files=full.files, base=2)
    m = open_manifest(sign_manifest(delta, identity), public_key=identity.public_key, pool_id="p")
    assert m.kept() == [kept]
    twice = msgspec.structs.replace(manifest().payload[0], name="a/model.bin.xor")
    with pytest.raises(ManifestError, match="same file"):
        sign_manifest(manifest(base=2, payload=[*manifest().payload, twice]), identity)


def with_pieces(piece_size: int, pieces: list[str]) -> Manifest:
    """20000 bytes in two 16 KiB shards, and in pieces of `piece_size`."""
    m = manifest(shard_size=16384, files=[FileEntry(path="a/model.bin", size=20000, hash=H)])
    p = msgspec.structs.replace(m.payload[0], size=20000, pieces=pieces)
    return msgspec.structs.replace(m, piece_size=piece_size, payload=[p])


def test_manifest_with_pieces_round_trips_and_uses_them(identity: Identity) -> None:
    m = with_pieces(4096, [H] * 5)
    opened = open_manifest(sign_manifest(m, identity), public_key=identity.public_key, pool_id="p")
    assert opened == m
    assert (opened.unit, units(opened, opened.payload[0])) == (4096, [H] * 5)
    assert unit_range(opened, opened.payload[0], 4) == (16384, 3616)


def test_manifest_without_pieces_encodes_as_before_pieces(identity: Identity) -> None:
    """Backward compatibility: no piece fields on the wire, so receivers that predate
    pieces (which refuse unknown fields) still read it, and the shard is the unit."""
    m = open_manifest(
        sign_manifest(manifest(), identity), public_key=identity.public_key, pool_id="p"
    )
    body = msgspec.msgpack.decode(msgspec.msgpack.decode(sign_manifest(m, identity))["body"])
    assert "piece_size" not in body and "pieces" not in body["payload"][0]
    assert (m.unit, units(m, m.payload[0])) == (4096, [H, H])


@pytest.mark.parametrize(
    ("piece_size", "pieces", "error"),
    [(4096, [H] * 4, "4 pieces, expected 5"), (5000, [H] * 4, "does not divide")],
)
def test_inconsistent_pieces_are_refused(
    identity: Identity, piece_size: int, pieces: list[str], error: str
) -> None:
    with pytest.raises(ManifestError, match=error):
        sign_manifest(with_pieces(piece_size, pieces), identity)


def test_pieces_without_a_piece_size_are_refused(identity: Identity) -> None:
    m = msgspec.structs.replace(
        manifest(), payload=[msgspec.structs.replace(manifest().payload[0], pieces=[H])]
    )
    with pytest.raises(ManifestError, match="1 pieces, expected 0"):
        sign_manifest(m, identity)


@settings(max_examples=30, deadline=None)
@given(
    size=st.integers(0, 20000),
    shard=st.sampled_from([4096, 5000, 8192]),
    split=st.sampled_from([None, 1, 2]),
)
def test_shard_and_piece_hashes_cover_the_file(
    tmp_path_factory, size: int, shard: int, split: int | None
) -> None:
    d = tmp_path_factory.mktemp("h")
    data = os.urandom(size)
    (d / "f").write_bytes(data)
    piece = shard // split if split else None
    got = hash_and_copy(d / "f", d / "copy", shard, piece)
    assert got.size == size
    assert got.hash == blake3.blake3(data).hexdigest()
    empty = [blake3.blake3(b"").hexdigest()]

    def grid(step: int) -> list[str]:
        return [blake3.blake3(data[i : i + step]).hexdigest() for i in range(0, size, step)]

    assert got.shards == (grid(shard) or empty)
    assert got.pieces == ((grid(piece) or empty) if piece else [])
    assert (d / "copy").read_bytes() == data


def test_list_files_skips_hidden_state(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_text("b")
    (tmp_path / "a").write_text("a")
    (tmp_path / ".shardcast-manifest").write_text("x")
    assert list_files(tmp_path) == ["a", "sub/b"]


@settings(max_examples=40, deadline=None)
@given(
    base=st.binary(max_size=5000),
    target=st.binary(max_size=5000),
    flips=st.lists(st.integers(0, 4999), max_size=20),
    block=st.sampled_from([8, 64, 1024, 1 << 20]),
)
def test_delta_reconstructs_exactly(tmp_path_factory, base, target, flips, block) -> None:
    d = tmp_path_factory.mktemp("d")
    # Half the cases: a target close to the base, as between training steps.
    if flips:
        t = bytearray(base)
        for i in flips:
            if i < len(t):
                t[i] ^= 0x5A
        target = bytes(t)
    (d / "base").write_bytes(base)
    (d / "target").write_bytes(target)
    encode_delta(d / "base", d / "target", d / "delta", block_size=block)
    digest = apply_delta(d / "base", d / "delta", d / "out")
    assert (d / "out").read_bytes() == target
    assert digest == blake3.blake3(target).hexdigest()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("changed", [0.001, 0.03, 0.5])
def test_delta_of_weights_is_small_and_exact(tmp_path: Path, dtype, changed: float) -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(600_000) * 0.02).astype(dtype)
    v = w.copy()
    idx = rng.choice(len(w), size=int(len(w) * changed), replace=False)
    v[idx] = np.nextafter(v[idx], dtype(1))  # one ulp: the typical small-lr change
    (tmp_path / "a").write_bytes(w.tobytes())
    (tmp_path / "b").write_bytes(v.tobytes())
    size = encode_delta(tmp_path / "a", tmp_path / "b", tmp_path / "d")
    apply_delta(tmp_path / "a", tmp_path / "d", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == v.tobytes()
    # Smaller than the changed elements alone would be, stored as they are.
    assert size < w.nbytes * max(changed, 0.002) * 0.9


def test_delta_of_identical_files_is_tiny(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(data)
    assert encode_delta(tmp_path / "a", tmp_path / "b", tmp_path / "d") < 100


@pytest.mark.parametrize("damage", ["truncate", "magic", "block"])
def test_malformed_delta_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    (tmp_path / "a").write_bytes(os.urandom(10000))
    (tmp_path / "b").write_bytes(os.urandom(10000))
    encode_delta(tmp_path / "a", tmp_path / "b", tmp_path / "d", block_size=4096)
    raw = bytearray((tmp_path / "d").read_bytes())
    if damage == "truncate":
        raw = raw[:30]
    elif damage == "magic":
        raw[:4] = b"NOPE"
    else:
        raw[40] ^= 0xFF
    (tmp_path / "d").write_bytes(bytes(raw))
    with pytest.raises(DeltaError):
        apply_delta(tmp_path / "a", tmp_path / "d", tmp_path / "out")
