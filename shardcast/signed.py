"""The envelope of everything the coordinator signs for SHARDCAST (manifests, peer lists):
msgpack `{body, public_key, signature}`, the signature over a domain tag plus the body, so
a signature for one kind of object can never pass as another."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from protocol.identity import Identity, verify_signature
from protocol.wire import PublicKey, Signature
from shardcast.errors import ShardcastError


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    body: bytes
    public_key: PublicKey
    signature: Signature


T = TypeVar("T")

_decoder = msgspec.msgpack.Decoder(Envelope)
_encoder = msgspec.msgpack.Encoder()


def seal(body: bytes, identity: Identity, domain: bytes) -> bytes:
    """`body` signed by `identity` under `domain`, as served."""
    return _encoder.encode(
        Envelope(body=body, public_key=identity.public_key, signature=identity.sign(domain + body))
    )


def unseal(
    data: bytes,
    *,
    public_key: bytes,
    pool_id: str,
    domain: bytes,
    max_bytes: int,
    body: msgspec.msgpack.Decoder[T],
    what: str,
    error: type[ShardcastError],
) -> T:
    """The decoded body of `data` if it is at most `max_bytes`, well formed, signed by
    `public_key` under `domain`, and for pool `pool_id`; else `error` (naming `what`)."""
    if len(data) > max_bytes:
        raise error(f"{what} of {len(data)} bytes exceeds {max_bytes}")
    try:
        env = _decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise error(f"malformed {what} envelope: {e}") from None
    if env.public_key != public_key:
        raise error(
            f"{what} signed by {env.public_key.hex()[:12]}, "
            f"not by the pool's coordinator {public_key.hex()[:12]}"
        )
    if not verify_signature(public_key, domain + env.body, env.signature):
        raise error(f"{what} signature does not verify")
    try:
        out: Any = body.decode(env.body)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise error(f"malformed {what}: {e}") from None
    if out.pool_id != pool_id:
        raise error(f"{what} is for pool {out.pool_id!r}, not {pool_id!r}")
    return out
