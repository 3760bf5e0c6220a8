import os
import stat

import pytest

from protocol.errors import KeyFileError
from protocol.identity import Identity, peer_id_of, verify_signature


def test_key_file_round_trip_is_private(tmp_path):
    path = tmp_path / "keys" / "node.key"
    ident = Identity.generate()
    ident.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.public_key == ident.public_key
    assert loaded.sign(b"m") == ident.sign(b"m")


def test_refuses_key_readable_by_others(tmp_path):
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Identity.load(path)


def test_refuses_overwrite_and_missing_and_garbage(tmp_path):
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        Identity.generate().save(path)
    with pytest.raises(KeyFileError, match="node keygen"):
        Identity.load(tmp_path / "absent.key")
    bad = tmp_path / "bad.key"
    bad.write_text("not json")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a swarmrl key file"):
        Identity.load(bad)


def test_mismatched_public_key_refused(tmp_path):
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    other = Identity.generate().public_key.hex()
    data = path.read_text()
    path.write_text(data.replace(data.split('"public_key": "')[1][:64], other))
    with pytest.raises(KeyFileError):
        Identity.load(path)


def test_load_or_create(tmp_path):
    path = tmp_path / "k"
    first, created = Identity.load_or_create(path)
    again, created_again = Identity.load_or_create(path)
    assert created and not created_again
    assert first.public_key == again.public_key


def test_same_seed_same_identity_in_libp2p_and_nacl():
    ident = Identity(bytes(range(32)))
    assert ident.libp2p_key_pair().public_key.to_bytes() == ident.public_key
    assert ident.peer_id() == peer_id_of(ident.public_key)
    assert ident.peer_id().startswith("12D3KooW")


def test_signature_checks():
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"hello")
    assert verify_signature(a.public_key, b"hello", sig)
    assert not verify_signature(b.public_key, b"hello", sig)
    assert not verify_signature(a.public_key, b"hellO", sig)
    assert not verify_signature(a.public_key, b"hello", sig[:-1])
    assert not verify_signature(a.public_key[:31], b"hello", sig)
