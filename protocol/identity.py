"""Node and coordinator identity: one ed25519 key for signatures and for the libp2p peer id.

The key file holds the 32-byte seed. libp2p derives its ed25519 key pair from the same seed
(RFC 8032), so the peer id a node shows on the network and the key that signs its messages are
the same identity.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import nacl.exceptions
import nacl.signing

from protocol.errors import KeyFileError

KEY_FILE_KIND = "swarmrl-ed25519"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class Identity:
    """An ed25519 signing key with the names it goes by."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise KeyFileError(f"an ed25519 seed is 32 bytes, got {len(seed)}")
        self._signing_key = nacl.signing.SigningKey(seed)
        self.seed = seed
        self.public_key: bytes = bytes(self._signing_key.verify_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(os.urandom(32))

    @property
    def short_id(self) -> str:
        """First 12 hex digits of the public key: enough to tell nodes apart in logs."""
        return self.public_key.hex()[:12]

    def sign(self, message: bytes) -> bytes:
        return self._signing_key.sign(message).signature

    def peer_id(self) -> str:
        """The libp2p peer id (`12D3KooW...`) of this key."""
        return peer_id_of(self.public_key)

    def libp2p_key_pair(self):  # -> libp2p.crypto.keys.KeyPair, imported lazily (heavy import)
        from libp2p.crypto.ed25519 import create_new_key_pair

        return create_new_key_pair(self.seed)

    def save(self, path: Path) -> None:
        """Write the key to `path`, readable only by its owner (0600); refuse to overwrite."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(
            {"kind": KEY_FILE_KIND, "seed": self.seed.hex(), "public_key": self.public_key.hex()},
            indent=2,
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read a key file written by `save`; refuse one that group or others can read."""
        path = Path(path)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise KeyFileError(
                f"no key file at {path}; create one with `node keygen --out {path}`"
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"{path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
                f"a private key must be private: run `chmod 600 {path}`"
            )
        try:
            data = json.loads(path.read_text())
            if data.get("kind") != KEY_FILE_KIND:
                raise ValueError(f"kind is {data.get('kind')!r}, expected {KEY_FILE_KIND!r}")
            identity = cls(bytes.fromhex(data["seed"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise KeyFileError(f"{path} is not a swarmrl key file: {e}") from None
        if "public_key" in data and data["public_key"] != identity.public_key.hex():
            raise KeyFileError(f"{path}: the public key does not match the seed")
        return identity

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[Identity, bool]:
        """Load the key at `path`, creating it first if absent. Returns (identity, created)."""
        if Path(path).exists():
            return cls.load(path), False
        identity = cls.generate()
        identity.save(path)
        return identity, True


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is `public_key`'s ed25519 signature of `message`."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        return False
    return True


def peer_id_of(public_key: bytes) -> str:
    """The libp2p peer id of an ed25519 public key."""
    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.peer.id import ID

    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)).to_base58()


def describe(identity: Identity, path: Path | None = None) -> str:
    """Human-readable lines naming an identity, for `keygen` and `info` commands."""
    lines = [f"public key: {identity.public_key.hex()}", f"peer id:    {identity.peer_id()}"]
    if path is not None:
        lines.append(f"key file:   {path}")
    return "\n".join(lines)
