"""Signed envelopes: who sent a message, for which pool, when, and that nobody changed it.

An envelope carries the exact body bytes that were signed. The signature covers a fixed binary
layout of (wire version, kind, pool id, signer, timestamp, nonce, body), each field length-
prefixed, so verifying never depends on re-serialising anything. `EnvelopeVerifier` checks the
signature, the kind, the pool, the signer (when a policy is given), the clock skew and replays.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from typing import Annotated, Generic

import msgspec

from protocol.errors import NotFresh, ProtocolError
from protocol.identity import Identity, verify_signature
from protocol.wire import WIRE_VERSION, M, Message, Nonce, PoolId, PublicKey, Signature, UInt
from protocol.wire import decode as decode_message
from protocol.wire import encode as encode_message

_DOMAIN = b"swarmrl/envelope/v1\x00"
ENVELOPE_OVERHEAD = 512  # generous bound on everything but the body


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    version: UInt
    kind: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    pool: PoolId
    signer: PublicKey
    timestamp_ms: UInt
    nonce: Nonce
    body: bytes
    signature: Signature

    def signed_bytes(self) -> bytes:
        return signing_bytes(
            self.version,
            self.kind,
            self.pool,
            self.signer,
            self.timestamp_ms,
            self.nonce,
            self.body,
        )


def signing_bytes(
    version: int, kind: str, pool: str, signer: bytes, timestamp_ms: int, nonce: bytes, body: bytes
) -> bytes:
    kind_b, pool_b = kind.encode(), pool.encode()
    return b"".join(
        (
            _DOMAIN,
            struct.pack(">H", version),
            struct.pack(">H", len(kind_b)),
            kind_b,
            struct.pack(">H", len(pool_b)),
            pool_b,
            signer,
            struct.pack(">Q", timestamp_ms),
            nonce,
            struct.pack(">Q", len(body)),
            body,
        )
    )


def seal(identity: Identity, pool_id: str, message: Message, now: float | None = None) -> bytes:
    """Sign `message` for `pool_id` and return the encoded envelope, ready to send."""
    body = encode_message(message)
    if len(body) > type(message).max_bytes:
        raise ProtocolError(
            f"{type(message).__name__} of {len(body)} bytes exceeds its "
            f"{type(message).max_bytes}-byte limit"
        )
    ts = int((time.time() if now is None else now) * 1000)
    nonce = os.urandom(16)
    kind = type(message).kind()
    sig = identity.sign(
        signing_bytes(WIRE_VERSION, kind, pool_id, identity.public_key, ts, nonce, body)
    )
    return encode_message(
        Envelope(WIRE_VERSION, kind, pool_id, identity.public_key, ts, nonce, body, sig)
    )


class ReplayGuard:
    """Remembers nonces for `window_s` seconds and refuses envelopes outside that window.

    Memory is bounded: expired nonces are dropped, and past `max_entries` live nonces new
    envelopes are refused (a flood of distinct nonces must not exhaust memory).
    """

    def __init__(
        self, window_s: float = 300.0, max_skew_s: float = 30.0, max_entries: int = 1_000_000
    ):
        self.window_s = window_s
        self.max_skew_s = max_skew_s
        self.max_entries = max_entries
        self._seen: dict[bytes, float] = {}
        self._next_purge = 0.0

    def check_and_remember(
        self, signer: bytes, nonce: bytes, timestamp_ms: int, now: float
    ) -> None:
        ts = timestamp_ms / 1000
        if ts > now + self.max_skew_s:
            raise NotFresh(
                f"timestamp is {ts - now:.0f} s in the future (max skew {self.max_skew_s:.0f} s); "
                "check the sender's clock"
            )
        if ts < now - self.window_s:
            raise NotFresh(
                f"message is {now - ts:.0f} s old, outside the {self.window_s:.0f} s replay window"
            )
        if now >= self._next_purge:
            self._seen = {k: exp for k, exp in self._seen.items() if exp > now}
            self._next_purge = now + min(self.window_s, 10.0)
        key = signer + nonce
        if key in self._seen:
            raise NotFresh("replayed message: this nonce was already seen from this signer")
        if len(self._seen) >= self.max_entries:
            raise NotFresh("replay guard is full; try again later")
        self._seen[key] = ts + self.window_s + self.max_skew_s


class Verified(msgspec.Struct, Generic[M], frozen=True):
    """A message whose envelope passed every check, with the raw envelope kept as evidence."""

    signer: bytes
    message: M
    timestamp_ms: int
    raw: bytes


class EnvelopeVerifier:
    """Opens envelopes for one pool: signature, kind, pool, signer policy, skew, replay."""

    def __init__(
        self,
        pool_id: str,
        guard: ReplayGuard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool_id = pool_id
        self.guard = guard or ReplayGuard()
        self.clock = clock

    def open(
        self,
        data: bytes,
        expected: type[M],
        signer: bytes | None = None,
        allowed_signer: Callable[[bytes], bool] | None = None,
    ) -> Verified[M]:
        """Verify an encoded envelope and decode its body as `expected`.

        `signer` pins the one key allowed to have signed it (e.g. the coordinator's);
        `allowed_signer` is a policy for many (e.g. joined, unbanned nodes).
        """
        env = decode_message(data, Envelope, max_bytes=expected.max_bytes + ENVELOPE_OVERHEAD)
        if env.version != WIRE_VERSION:
            raise ProtocolError(
                f"wire version {env.version} is not supported (this build speaks {WIRE_VERSION}); "
                "upgrade swarmrl on the older side"
            )
        if env.kind != expected.kind():
            raise ProtocolError(f"expected a {expected.kind()!r} message, got {env.kind!r}")
        if env.pool != self.pool_id:
            raise ProtocolError(f"message is for pool {env.pool}, not {self.pool_id}")
        if not verify_signature(env.signer, env.signed_bytes(), env.signature):
            raise ProtocolError("bad signature")
        if signer is not None and env.signer != signer:
            raise ProtocolError(f"signed by {env.signer.hex()[:12]}, expected {signer.hex()[:12]}")
        if allowed_signer is not None and not allowed_signer(env.signer):
            raise ProtocolError(f"signer {env.signer.hex()[:12]} is not allowed here")
        self.guard.check_and_remember(env.signer, env.nonce, env.timestamp_ms, self.clock())
        message = decode_message(env.body, expected)
        return Verified(env.signer, message, env.timestamp_ms, bytes(data))
