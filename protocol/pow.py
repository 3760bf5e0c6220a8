"""Proof of work on join: a price on new identities.

An identity is a free key, so an open pool cannot stop someone from making a thousand. A join
proof makes each new key cost about 2**bits hashes (BLAKE3 of the pool id, the key and a nonce
must start with `bits` zero bits) while checking one costs a single hash. The difficulty is
`limits.join_pow_bits` in the pool spec (0, off, in the local demo); the coordinator also caps
how many new identities it admits per minute, whatever they paid.
"""

from __future__ import annotations

import struct

import blake3


def _digest(pool_id: str, key: bytes, nonce: int) -> bytes:
    return blake3.blake3(
        b"swarmrl-join-pow\x00" + pool_id.encode() + b"\x00" + key + struct.pack(">Q", nonce)
    ).digest(8)


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def check(pool_id: str, key: bytes, nonce: int, bits: int) -> bool:
    """Whether `nonce` proves `bits` bits of work for `key` in this pool."""
    if bits <= 0:
        return True
    if not 0 <= nonce < 2**64:
        return False
    return leading_zero_bits(_digest(pool_id, key, nonce)) >= bits


def solve(pool_id: str, key: bytes, bits: int, max_tries: int = 1 << 32) -> int:
    """The smallest nonce that proves `bits` bits of work (about 2**bits hashes)."""
    if bits <= 0:
        return 0
    if bits > 40:
        raise ValueError(f"a join proof of {bits} bits is beyond what a node can pay")
    for nonce in range(max_tries):
        if leading_zero_bits(_digest(pool_id, key, nonce)) >= bits:
            return nonce
    raise ValueError(f"no {bits}-bit proof within {max_tries} tries")
