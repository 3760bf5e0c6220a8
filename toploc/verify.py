"""Check TOPLOC proofs against states the verifier recomputed itself.

For each chunk the verifier takes its own top-k, evaluates the prover's polynomial at
(index mod the proof's modulus), and compares the claimed bf16 values with its own:
exponent mismatches, mantissa error statistics over exponent-matching positions, and the
sign, which the reference ignores. A proof that cannot be parsed is a rejected verdict with a
reason; nothing a prover sends can make this module raise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def compare_bits_rows(
    claimed: np.ndarray, actual: np.ndarray
) -> list[tuple[int, int, float, float]]:
    """(exp mismatches, sign mismatches among exponent matches, mantissa error mean, median)
    for each row of two [C, k] arrays of bf16 bit patterns, vectorised over the rows (the
    mantissa statistics are taken over each row's exponent matches; inf where there are
    none)."""
    exp_c, exp_a = (claimed >> 7) & 0xFF, (actual >> 7) & 0xFF
    exp_match = exp_c == exp_a
    sign_mis = (((claimed >> 15) != (actual >> 15)) & exp_match).sum(axis=1)
    # Mantissa errors are 0..127; a mismatched exponent's slot reads 128 and sorts last, so
    # each row's first `matched` sorted values are its own statistics.
    mant_err = np.where(exp_match, np.abs((claimed & 0x7F) - (actual & 0x7F)), 128)
    matched = exp_match.sum(axis=1)
    ranked = np.sort(mant_err, axis=1)
    low = np.take_along_axis(ranked, np.maximum(matched - 1, 0)[:, None] // 2, axis=1)[:, 0]
    high = np.take_along_axis(ranked, (matched // 2)[:, None], axis=1)[:, 0]
    has = matched > 0
    mean = np.full(claimed.shape[0], math.inf)
    median = np.full(claimed.shape[0], math.inf)
    mean[has] = np.where(exp_match, mant_err, 0)[has].sum(axis=1) / matched[has]
    median[has] = (low[has] + high[has]) / 2
    mismatched = (~exp_match).sum(axis=1)
    return [
        (int(e), int(g), float(m), float(d))
        for e, g, m, d in zip(mismatched, sign_mis, mean, median, strict=True)
    ]


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
    return verify_proofs_many([(hidden, proofs)], chunk_size, topk, thresholds)[0]


def verify_proofs_many(
    cases: Sequence[tuple[torch.Tensor, object]],
    chunk_size: int = CHUNK_SIZE,
    topk: int = TOPK,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> list[list[ChunkVerdict]]:
    """`verify_proofs` of each (hidden, proofs) case, with the chunks of one shape from every
    case taken through top-k, the polynomial and the comparison together (a validator checks
    a submission's rollouts at once: one by one, the per-call overhead cost as much as the
    work on a small model). Each chunk is judged on its own rows only, so each case gets the
    verdicts it gets alone."""
    out: list[list[ChunkVerdict | None]] = []
    # (rows, width) -> (case, chunk, its bf16 states [rows, width], its proof)
    by_shape: dict[tuple[int, int], list[tuple[int, int, torch.Tensor, object]]] = {}
    for c, (hidden, proofs) in enumerate(cases):
        check_hidden(hidden, chunk_size, topk)
        n = hidden.shape[0]
        expected = -(-n // chunk_size)
        if not isinstance(proofs, list | tuple) or len(proofs) != expected:
            got = len(proofs) if isinstance(proofs, list | tuple) else type(proofs).__name__
            reason = f"expected {expected} proofs for {n} tokens, got {got}"
            out.append([ChunkVerdict(i, False, reason) for i in range(max(expected, 1))])
            continue
        out.append([None] * expected)
        start = 0
        for group in split_chunks(hidden.detach().to(torch.bfloat16), chunk_size):
            shape = (group.shape[1], group.shape[2])
            for j in range(group.shape[0]):
                by_shape.setdefault(shape, []).append((c, start + j, group[j], proofs[start + j]))
            start += group.shape[0]
    for (rows, width), chunks in by_shape.items():
        k = effective_k(rows, width, topk)
        parsed: list[tuple[int, np.ndarray] | str] = []
        for *_, proof in chunks:
            try:
                p = decode_proof(proof, k)
                parsed.append((p.modulus, p.coeffs))
            except ProofError as e:
                parsed.append(str(e))
        good = [i for i, p in enumerate(parsed) if not isinstance(p, str)]
        stats = {}
        if good:
            idx, bits = topk_chunks(torch.stack([chunks[i][2] for i in good]), k)
            mods = np.array([parsed[i][0] for i in good], dtype=np.int64)[:, None]
            coeffs = np.stack([parsed[i][1] for i in good])
            # Always reduce by the proof's own modulus (the reference's Python path does not).
            claimed = evaluate(coeffs, idx % mods)
            # The prover reduced the bits mod P (only NaN patterns change); so does the verifier,
            # so identical states always verify.
            bits = bits % P
            stats = dict(zip(good, compare_bits_rows(claimed, bits), strict=True))
        for i, ((c, chunk, _, _), p) in enumerate(zip(chunks, parsed, strict=True)):
            if isinstance(p, str):
                out[c][chunk] = ChunkVerdict(chunk=chunk, ok=False, reason=f"malformed: {p}")
            else:
                out[c][chunk] = judge(chunk, stats[i], k, topk, thresholds)
    return [[v for v in verdicts if v is not None] for verdicts in out]
