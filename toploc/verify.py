"""Check TOPLOC proofs against states the verifier recomputed itself.

For each chunk the verifier takes its own top-k, evaluates the prover's polynomial at
(index mod the proof's modulus), and compares the claimed bf16 values with its own:
exponent mismatches, mantissa error statistics over exponent-matching positions, and the
sign, which the reference ignores. A proof that cannot be parsed is a rejected verdict with a
reason; nothing a prover sends can make this module raise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from toploc.proof import (
    CHUNK_SIZE,
    TOPK,
    P,
    ProofError,
    check_hidden,
    decode_proof,
    effective_k,
    evaluate,
    split_chunks,
    topk_chunks,
)


@dataclass(frozen=True)
class Thresholds:
    """Reject a chunk above any of these (the published values, for k = 128).

    A sign mismatch at a position whose exponent matches counts like an exponent mismatch.
    For a chunk with fewer than 128 values (k < 128) the mismatch budget scales with k.
    """

    max_exp_mismatches: int = 38
    max_mant_err_mean: float = 10.0
    max_mant_err_median: float = 8.0


DEFAULT_THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class ChunkVerdict:
    """The outcome for one chunk. Statistics are -1 / inf when the proof could not be read."""

    chunk: int
    ok: bool
    reason: str
    exp_mismatches: int = -1
    sign_mismatches: int = -1
    mant_err_mean: float = math.inf
    mant_err_median: float = math.inf


def all_ok(verdicts: list[ChunkVerdict]) -> bool:
    """True when there is at least one verdict and every one accepts."""
    return bool(verdicts) and all(v.ok for v in verdicts)


def compare_bits(claimed: np.ndarray, actual: np.ndarray) -> tuple[int, int, float, float]:
    """(exp mismatches, sign mismatches among exponent matches, mantissa mean, median)."""
    exp_c, exp_a = (claimed >> 7) & 0xFF, (actual >> 7) & 0xFF
    exp_match = exp_c == exp_a
    sign_mis = int(((claimed >> 15) != (actual >> 15))[exp_match].sum())
    mant_err = np.abs((claimed & 0x7F) - (actual & 0x7F))[exp_match]
    if mant_err.size == 0:
        return int((~exp_match).sum()), sign_mis, math.inf, math.inf
    return (
        int((~exp_match).sum()),
        sign_mis,
        float(mant_err.mean()),
        float(np.median(mant_err)),
    )


def judge(
    chunk: int, stats: tuple[int, int, float, float], k: int, topk: int, th: Thresholds
) -> ChunkVerdict:
    exp_mis, sign_mis, mean, median = stats
    budget = th.max_exp_mismatches * k // topk
    reasons = []
    if exp_mis + sign_mis > budget:
        reasons.append(f"{exp_mis} exponent + {sign_mis} sign mismatches > {budget}")
    if mean > th.max_mant_err_mean:
        reasons.append(f"mantissa error mean {mean:.2f} > {th.max_mant_err_mean}")
    if median > th.max_mant_err_median:
        reasons.append(f"mantissa error median {median:.2f} > {th.max_mant_err_median}")
    return ChunkVerdict(
        chunk=chunk,
        ok=not reasons,
        reason="; ".join(reasons) if reasons else "ok",
        exp_mismatches=exp_mis,
        sign_mismatches=sign_mis,
        mant_err_mean=mean,
        mant_err_median=median,
    )


def verify_proofs(
    hidden: torch.Tensor,
    proofs: object,
    chunk_size: int = CHUNK_SIZE,
    topk: int = TOPK,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> list[ChunkVerdict]:
    """One verdict per chunk of the verifier's own states `hidden` [N, H] (rows P-1 ..
    P+N-2 of a prefill of prompt + completion[:-1]).

    `proofs` comes from the prover and may be anything: a wrong count, a non-list, malformed
    entries all give rejected verdicts with the reason. `hidden` is the verifier's own tensor;
    a wrongly shaped one is a programming error and raises ValueError.
    """
    check_hidden(hidden, chunk_size, topk)
    n = hidden.shape[0]
    expected = -(-n // chunk_size)
    if not isinstance(proofs, list | tuple) or len(proofs) != expected:
        got = len(proofs) if isinstance(proofs, list | tuple) else type(proofs).__name__
        reason = f"expected {expected} proofs for {n} tokens, got {got}"
        return [ChunkVerdict(chunk=i, ok=False, reason=reason) for i in range(max(expected, 1))]

    verdicts: list[ChunkVerdict] = []
    start = 0
    for group in split_chunks(hidden.detach().to(torch.bfloat16), chunk_size):
        count = group.shape[0]
        k = effective_k(group.shape[1], group.shape[2], topk)
        parsed: list[tuple[int, np.ndarray] | str] = []
        for proof in proofs[start : start + count]:
            try:
                p = decode_proof(proof, k)
                parsed.append((p.modulus, p.coeffs))
            except ProofError as e:
                parsed.append(str(e))
        good = [i for i, p in enumerate(parsed) if not isinstance(p, str)]
        if good:
            idx, bits = topk_chunks(group[good], k)
            mods = np.array([parsed[i][0] for i in good], dtype=np.int64)[:, None]
            coeffs = np.stack([parsed[i][1] for i in good])
            # Always reduce by the proof's own modulus (the reference's Python path does not).
            claimed = evaluate(coeffs, idx % mods)
            # The prover reduced the bits mod P (only NaN patterns change); so does the verifier,
            # so identical states always verify.
            bits = bits % P
            stats = {i: compare_bits(claimed[r], bits[r]) for r, i in enumerate(good)}
        for i, p in enumerate(parsed):
            if isinstance(p, str):
                verdicts.append(ChunkVerdict(chunk=start + i, ok=False, reason=f"malformed: {p}"))
            else:
                verdicts.append(judge(start + i, stats[i], k, topk, thresholds))
        start += count
    return verdicts
