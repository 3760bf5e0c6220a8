"""The proof format, pinned by hand-computed vectors and an independent scalar reimplementation."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toploc import P, build_proofs, build_proofs_many, decode_proof, verify_proofs
from toploc.proof import injective_modulus, interpolate


def bf16_from_bits(bits: list[int]) -> torch.Tensor:
    signed = [b - 65536 if b >= 32768 else b for b in bits]
    return torch.tensor(signed, dtype=torch.int16).view(torch.bfloat16)


def scalar_proof(chunk: torch.Tensor, k: int) -> bytes:
    """The published algorithm written plainly: top-k by |x| of the bf16 chunk, the reference's
    modulus search, Lagrange interpolation over GF(P) with Python integers."""
    flat = chunk.to(torch.bfloat16).reshape(-1)
    idx = flat.abs().topk(k).indices.tolist()
    bits = [int(b) & 0xFFFF for b in flat[idx].view(torch.int16).tolist()]
    m = next(m for m in range(P, 2**15, -1) if len({i % m for i in idx}) == k)
    xs = [i % m for i in idx]
    ys = [b % P for b in bits]
    coeffs = [0] * k
    for i in range(k):
        num, denom = [1], 1
        for j in range(k):
            if j != i:
                # num *= (x - x_j)
                num = [
                    ((num[d - 1] if d else 0) - xs[j] * (num[d] if d < len(num) else 0)) % P
                    for d in range(len(num) + 1)
                ]
                denom = denom * (xs[i] - xs[j]) % P
        scale = ys[i] * pow(denom, P - 2, P) % P
        coeffs = [(c + scale * n) % P for c, n in zip(coeffs, num, strict=True)]
    return m.to_bytes(2, "big") + b"".join(c.to_bytes(2, "big") for c in coeffs)


def test_k1_is_the_value_bits():
    # One value 3.0: bf16 0x4040; a constant polynomial.
    assert build_proofs(torch.tensor([[3.0]]), topk=1) == [bytes.fromhex("ffd9 4040")]


def test_k2_hand_computed():
    # Top-2 of |[0.5, -2, 0, 1]|: index 1 (-2.0 = 0xC000 = 49152), index 3 (1.0 = 0x3F80 = 16256).
    # Line through (1, 49152), (3, 16256) over GF(65497): slope -32896/2 = -16448 = 49049,
    # intercept 49152 + 16448 = 65600 = 103. Bytes: ffd9 | 0067 | bf99.
    proofs = build_proofs(torch.tensor([[0.5, -2.0, 0.0, 1.0]]), topk=2)
    assert proofs == [bytes.fromhex("ffd9 0067 bf99")]


def test_k2_colliding_indices_lower_the_modulus():
    # Indices 5 and 65502 collide mod 65497 (both 5); mod 65496 they are 5 and 6.
    # Points (5, 4.0 = 0x4080 = 16512), (6, -1.0 = 0xBF80 = 49024): slope 32512 = 0x7f00,
    # intercept 16512 - 5 * 32512 = -146048 = 50443 = 0xc50b. Modulus 65496 = 0xffd8.
    row = torch.zeros(1, 65600)
    row[0, 5] = 4.0
    row[0, 65502] = -1.0
    assert build_proofs(row, topk=2) == [bytes.fromhex("ffd8 c50b 7f00")]
    assert injective_modulus(np.array([5, 65502])) == 65496


def test_interpolation_reproduces_points():
    rng = np.random.default_rng(0)
    xs = np.stack([rng.choice(P, 128, replace=False) for _ in range(3)])
    ys = rng.integers(0, P, size=(3, 128))
    from toploc.proof import evaluate

    assert (evaluate(interpolate(xs, ys), xs) == ys).all()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    rows=st.integers(1, 6),
    width=st.integers(3, 40),
    k=st.integers(1, 12),
)
def test_matches_scalar_reference(seed, rows, width, k):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=g) * 3
    expected = [
        scalar_proof(hidden[i : i + 2], min(k, hidden[i : i + 2].numel()))
        for i in range(0, rows, 2)
    ]
    assert build_proofs(hidden, chunk_size=2, topk=k) == expected


def test_full_size_chunk_matches_scalar_reference_and_is_258_bytes():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(32, 64, generator=g)
    (proof,) = build_proofs(hidden)
    assert len(proof) == 258
    assert proof == scalar_proof(hidden, 128)


def test_collisions_in_a_batch_of_chunks_match_reference():
    # Many chunks of width 4096: a few collide mod 65497 and take a lower modulus.
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(32 * 24, 4096, generator=g)
    proofs = build_proofs(hidden)
    moduli = [int.from_bytes(p[:2], "big") for p in proofs]
    assert any(m < P for m in moduli)
    for i in (moduli.index(min(moduli)), 0):
        assert proofs[i] == scalar_proof(hidden[32 * i : 32 * i + 32], 128)
    assert all(v.ok and v.exp_mismatches == 0 for v in verify_proofs(hidden, proofs))


def test_short_last_chunk():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(70, 64, generator=g)
    proofs = build_proofs(hidden)
    assert len(proofs) == 3
    assert proofs[2] == build_proofs(hidden[64:])[0] == scalar_proof(hidden[64:], 128)
    # A chunk with fewer values than k commits to all of them.
    tiny = build_proofs(hidden[:1, :10])
    assert len(tiny[0]) == 2 + 2 * 10


def test_many_rollouts_proven_together_match_each_proven_alone():
    # Rollouts of every kind at once: several full chunks and a short one, a single row, a
    # chunk with fewer values than k (its own k), none at all, and one collision-prone width.
    g = torch.Generator().manual_seed(5)
    hiddens = [
        torch.randn(70, 64, generator=g),
        torch.randn(1, 64, generator=g),
        torch.randn(3, 16, generator=g),
        torch.randn(0, 64, generator=g),
        torch.randn(32 * 6, 4096, generator=g),
        torch.randn(4, 64, generator=g).to(torch.bfloat16),
    ]
    together = build_proofs_many(hiddens)
    assert together == [build_proofs(h) for h in hiddens]
    assert [len(p) for p in together] == [3, 1, 1, 0, 6, 1]
    assert together[0][2] == scalar_proof(hiddens[0][64:], 128)
    assert together[2][0] == scalar_proof(hiddens[2], 48)  # 3 x 16 values: k = 48
    assert together[5][0] == scalar_proof(hiddens[5], 128)
    assert build_proofs_many([]) == []


def test_ties_inside_topk_are_deterministic():
    hidden = torch.ones(2, 8)
    hidden[0, 3] = -1.0
    p1 = build_proofs(hidden, topk=16)
    assert p1 == build_proofs(hidden.clone(), topk=16) == [scalar_proof(hidden, 16)]


def test_ties_across_the_topk_boundary_verify_on_the_same_layout():
    hidden = torch.zeros(32, 64)
    hidden[:, :10] = 2.0  # 320 equal values compete for 128 places
    proofs = build_proofs(hidden)
    assert proofs == build_proofs(hidden.clone())
    (v,) = verify_proofs(hidden, proofs)
    assert v.ok and v.exp_mismatches == 0


def test_bf16_nan_and_inf():
    # +inf 0x7f80, -inf 0xff80, NaN 0x7fc0, negative NaN 0xffff (65535 reduces to 38 mod P).
    values = bf16_from_bits([0x7F80, 0xFF80, 0x7FC0, 0xFFFF, 0x3F80, 0x0000])
    hidden = values.view(1, -1)
    proofs = build_proofs(hidden, topk=5)
    assert proofs == [scalar_proof(hidden, 5)]
    proof = decode_proof(proofs[0], 5)
    assert proof.modulus == P
    (v,) = verify_proofs(hidden, proofs, topk=5)
    assert v.ok and v.exp_mismatches == 0 and v.sign_mismatches == 0


def test_fp32_and_fp16_inputs_round_to_bf16():
    g = torch.Generator().manual_seed(5)
    h32 = torch.randn(40, 96, generator=g)
    assert build_proofs(h32) == build_proofs(h32.to(torch.bfloat16))
    h16 = h32.to(torch.float16)
    assert build_proofs(h16) == build_proofs(h16.to(torch.bfloat16))
