"""TOPLOC proof format and its arithmetic over GF(65497), vectorised over chunks.

A proof commits to the k largest-magnitude entries of one chunk of final-norm states (bf16):
the polynomial of degree < k through (flat index mod m, bf16 bits mod P), written as
`m` (uint16 big-endian) followed by its k coefficients in ascending powers (uint16
big-endian each): 2 + 2k bytes, 258 for k = 128. This is the published format, byte for
byte: the same activations give the same bytes as the reference library.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from protocol.errors import SwarmError

P = 65497  # the field's prime; also the largest modulus a proof may carry
CHUNK_SIZE = 32
TOPK = 128

# Inverses of every field element (index 0 unused), computed once by Fermat: a^(P-2).
_INV: np.ndarray | None = None


class ProofError(SwarmError):
    """A proof is malformed (wrong length, modulus out of range, coefficient out of field)."""


@dataclass(frozen=True)
class Proof:
    """A decoded proof: the modulus and the coefficients in ascending powers."""

    modulus: int
    coeffs: np.ndarray  # int64, shape [k], each in [0, P)


def _inverse_table() -> np.ndarray:
    global _INV
    if _INV is None:
        base = np.arange(P, dtype=np.int64)
        result = np.ones(P, dtype=np.int64)
        exp = P - 2
        while exp:
            if exp & 1:
                result = result * base % P
            base = base * base % P
            exp >>= 1
        _INV = result
    return _INV


def topk_chunks(chunks: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by magnitude of each flattened chunk, on the chunks' device.

    `chunks` is [C, R, H] in bf16; returns (flat indices [C, k], bf16 bits [C, k]) on the host.
    torch.topk on |x| of the bf16 values is the reference's routine, so ties break the same way
    for prover and verifier on the same device and layout.
    """
    flat = chunks.reshape(chunks.shape[0], -1)
    idx = flat.abs().topk(k, dim=1).indices
    # Gather the bit patterns as integers: gathering bf16 values rewrites NaN payloads.
    bits = flat.view(torch.int16).gather(1, idx).to(torch.int64) & 0xFFFF
    return idx.cpu().numpy().astype(np.int64), bits.cpu().numpy()


def injective_modulus(indices: np.ndarray) -> int:
    """The largest m <= P under which the indices are pairwise distinct (reference order)."""
    k = len(indices)
    for m in range(P, k - 1, -1):
        if len(np.unique(indices % m)) == k:
            return m
    raise ProofError(f"no injective modulus for {k} indices")  # impossible: distinct indices < m


def injective_moduli(indices: np.ndarray) -> np.ndarray:
    """`injective_modulus` of each row of `indices` [C, k]; the common case in one pass."""
    s = np.sort(indices % P, axis=1)
    collide = (np.diff(s, axis=1) == 0).any(axis=1)
    mods = np.full(indices.shape[0], P, dtype=np.int64)
    for c in np.nonzero(collide)[0]:
        mods[c] = injective_modulus(indices[c])
    return mods


def interpolate(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Coefficients (ascending) of the polynomials of degree < k through the points of each row.

    xs, ys: int64 [C, k], xs distinct within a row, all in [0, P). Newton divided differences,
    then the Newton form expanded into monomials; every step runs over all chunks at once.
    """
    inv = _inverse_table()
    c = ys % P
    k = xs.shape[1]
    # Differences lie in (-P, P) and inverses below P: products fit int64, and numpy's % is
    # non-negative for a positive modulus, so one reduction per step suffices.
    for j in range(1, k):
        denom = inv[(xs[:, j:] - xs[:, :-j]) % P]
        c[:, j:] = (c[:, j:] - c[:, j - 1 : -1]) * denom % P
    # Horner on the Newton form: poly = c[k-1]; poly = poly * (x - x_i) + c[i], i = k-2 .. 0.
    poly = np.zeros_like(c)
    poly[:, 0] = c[:, k - 1]
    nxt = np.empty_like(poly)
    for i in range(k - 2, -1, -1):
        np.multiply(poly, -xs[:, i : i + 1], out=nxt)
        nxt[:, 1:] += poly[:, :-1]
        nxt[:, 0] += c[:, i]
        np.remainder(nxt, P, out=poly)
    return poly


def evaluate(coeffs: np.ndarray, xs: np.ndarray, block: int = 16) -> np.ndarray:
    """Values of each row's polynomial (ascending coeffs [C, k]) at that row's xs [C, n].

    Baby-step giant-step instead of Horner's k sequential steps: with powers x^0..x^(b-1) and
    (x^b)^a, p(x) = sum_a (x^b)^a * sum_j c[a*b + j] x^j, where each inner sum is one small
    integer matrix product (b products below 2^32 sum below 2^63).
    """
    c, k = coeffs.shape
    blocks = -(-k // block)
    padded = np.zeros((c, blocks * block), dtype=np.int64)
    padded[:, :k] = coeffs
    baby = np.empty((*xs.shape, block), dtype=np.int64)
    baby[..., 0] = 1
    for j in range(1, block):
        baby[..., j] = baby[..., j - 1] * xs % P
    inner = np.einsum("cnj,caj->cna", baby, padded.reshape(c, blocks, block)) % P
    giant_step = baby[..., block - 1] * xs % P
    acc = inner[..., blocks - 1]
    for a in range(blocks - 2, -1, -1):
        acc = (acc * giant_step + inner[..., a]) % P
    return acc


def encode_proof(modulus: int, coeffs: np.ndarray) -> bytes:
    """The wire bytes: modulus then coefficients, each uint16 big-endian."""
    return np.concatenate([[modulus], coeffs]).astype(">u2").tobytes()


def decode_proof(data: object, k: int) -> Proof:
    """Parse and validate one proof of `k` coefficients; raises ProofError with the reason."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProofError(f"proof must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) != 2 + 2 * k:
        raise ProofError(f"proof is {len(raw)} bytes, expected {2 + 2 * k} for k={k}")
    words = np.frombuffer(raw, dtype=">u2").astype(np.int64)
    modulus = int(words[0])
    if not 1 <= modulus <= P:
        raise ProofError(f"modulus {modulus} outside 1..{P}")
    coeffs = words[1:]
    if (coeffs >= P).any():
        raise ProofError(f"coefficient outside GF({P})")
    return Proof(modulus, coeffs)


def split_chunks(hidden: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """Groups of equal-shape chunks [C, R, H] covering the rows of `hidden` [N, H] in order:
    the full chunks together, then the short last chunk alone."""
    n = hidden.shape[0]
    full = n // chunk_size
    groups = []
    if full:
        groups.append(hidden[: full * chunk_size].reshape(full, chunk_size, hidden.shape[1]))
    if n % chunk_size:
        groups.append(hidden[full * chunk_size :].unsqueeze(0))
    return groups


def effective_k(rows: int, width: int, topk: int) -> int:
    """A chunk smaller than k values commits to all of them."""
    return min(topk, rows * width)


def check_hidden(hidden: torch.Tensor, chunk_size: int, topk: int) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError("hidden must be a [N, H] tensor of final-norm states")
    if chunk_size < 1 or topk < 1:
        raise ValueError("chunk_size and topk must be positive")


def build_proofs(
    hidden: torch.Tensor, chunk_size: int = CHUNK_SIZE, topk: int = TOPK
) -> list[bytes]:
    """One proof per chunk of `chunk_size` rows of `hidden` [N, H] (rows P-1 .. P+N-2).

    States are rounded to bf16 first (a no-op for bf16 models); top-k runs on their device.
    """
    return build_proofs_many([hidden], chunk_size, topk)[0]


def build_proofs_many(
    hiddens: list[torch.Tensor], chunk_size: int = CHUNK_SIZE, topk: int = TOPK
) -> list[list[bytes]]:
    """`build_proofs` of each of `hiddens`, byte for byte, with the interpolation of every
    chunk of every rollout done together: its k steps cost the same numpy calls for one chunk
    as for thousands, and a lease of short completions has one chunk a rollout (proving them
    one by one took 4x the generation's time on the tiny demo)."""
    picks: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # (rollout, k, indices, bits)
    for i, hidden in enumerate(hiddens):
        check_hidden(hidden, chunk_size, topk)
        for group in split_chunks(hidden.detach().to(torch.bfloat16), chunk_size):
            k = effective_k(group.shape[1], group.shape[2], topk)
            picks.append((i, k, *topk_chunks(group, k)))
    encoded: dict[int, Iterator[bytes]] = {}
    for k in {k for _, k, _, _ in picks}:
        idx = np.concatenate([p[2] for p in picks if p[1] == k])
        bits = np.concatenate([p[3] for p in picks if p[1] == k])
        mods = injective_moduli(idx)
        coeffs = interpolate(idx % mods[:, None], bits)
        encoded[k] = iter([encode_proof(int(m), c) for m, c in zip(mods, coeffs, strict=True)])
    proofs: list[list[bytes]] = [[] for _ in hiddens]
    for i, k, idx, _ in picks:  # back to each rollout, in the order they were concatenated
        proofs[i].extend(itertools.islice(encoded[k], len(idx)))
    return proofs
