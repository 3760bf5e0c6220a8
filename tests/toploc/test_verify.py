"""Verdicts: honest states pass, other states fail, and no proof bytes can crash the verifier."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toploc import P, Thresholds, all_ok, build_proofs, verify_proofs, verify_proofs_many
from toploc.verify import compare_bits_rows

G = torch.Generator().manual_seed(11)
HIDDEN = torch.randn(70, 256, generator=G)  # chunks of 32, 32, 6 rows
PROOFS = build_proofs(HIDDEN)


def test_identical_states_verify_exactly():
    verdicts = verify_proofs(HIDDEN, PROOFS)
    assert [v.chunk for v in verdicts] == [0, 1, 2]
    assert all_ok(verdicts)
    assert all(v.exp_mismatches == 0 and v.mant_err_mean == 0.0 for v in verdicts)


def test_small_noise_passes_and_other_states_fail():
    noisy = HIDDEN * (1 + 1e-2 * torch.randn(HIDDEN.shape, generator=G))
    assert all_ok(verify_proofs(noisy, PROOFS))
    other = torch.randn(HIDDEN.shape, generator=G)
    verdicts = verify_proofs(other, PROOFS)
    assert not any(v.ok for v in verdicts)
    assert all(v.exp_mismatches > 38 for v in verdicts)


def test_sign_flip_is_caught_only_by_the_sign_comparison():
    flipped = HIDDEN.clone()
    flipped[:32] = -flipped[:32]
    v = verify_proofs(flipped, PROOFS)[0]
    assert v.exp_mismatches == 0 and v.mant_err_mean == 0.0  # the reference would accept
    assert v.sign_mismatches == 128 and not v.ok


def test_thresholds_decide():
    noisy = HIDDEN * (1 + 3e-2 * torch.randn(HIDDEN.shape, generator=G))
    v = verify_proofs(noisy, PROOFS)[0]
    assert v.ok
    strict = Thresholds(max_exp_mismatches=v.exp_mismatches - 1)
    assert not verify_proofs(noisy, PROOFS, thresholds=strict)[0].ok


def test_compare_bits_statistics():
    import numpy as np

    claimed = np.array([0x3F80, 0x3F85, 0x4000, 0xBF80])
    actual = np.array([0x3F80, 0x3F80, 0x3F80, 0x3F80])
    # exponents: equal, equal, differ, equal (sign differs); mantissa errors 0, 5, 0.
    ((exp_mis, sign_mis, mean, median),) = compare_bits_rows(claimed[None], actual[None])
    assert (exp_mis, sign_mis, mean, median) == (1, 1, 5 / 3, 0.0)
    assert compare_bits_rows(np.array([[0x4000]]), np.array([[0x3F80]]))[0][2] == math.inf


def test_modulus_is_always_taken_from_the_proof():
    # A chunk whose indices collide mod P carries a lower modulus; verifying must use it.
    row = torch.zeros(1, 65600)
    row[0, 5], row[0, 65502] = 4.0, -1.0
    proofs = build_proofs(row, topk=2)
    assert int.from_bytes(proofs[0][:2], "big") == 65496
    assert verify_proofs(row, proofs, topk=2)[0].ok


def rejected_with_reason(verdicts, expected_count):
    assert len(verdicts) == expected_count
    assert not all_ok(verdicts)
    assert all(isinstance(v.reason, str) and v.reason for v in verdicts)
    return verdicts


def test_wrong_count_is_rejected():
    for proofs in (PROOFS[:2], [*PROOFS, PROOFS[0]], [], None, b"x" * 258, "proofs"):
        rejected_with_reason(verify_proofs(HIDDEN, proofs), 3)


def test_specific_malformations():
    good = PROOFS[0]
    cases = {
        "modulus 0": b"\x00\x00" + good[2:],
        "modulus above P": (P + 1).to_bytes(2, "big") + good[2:],
        "truncated": good[:-1],
        "too long": good + b"\x00",
        "two bytes": good[:2],
        "empty": b"",
        "coefficient outside the field": good[:2] + b"\xff\xff" + good[4:],
        "not bytes": 12345,
    }
    for name, bad in cases.items():
        v = verify_proofs(HIDDEN, [bad, PROOFS[1], PROOFS[2]])
        assert not v[0].ok, name
        assert v[0].reason.startswith("malformed"), name
        assert v[1].ok and v[2].ok, name


proof_like = st.one_of(
    st.binary(max_size=600),
    st.binary(min_size=258, max_size=258),
    st.builds(
        lambda m, rest: m.to_bytes(2, "big") + rest,
        st.sampled_from([0, 1, P - 1, P, P + 1, 65535]),
        st.binary(min_size=256, max_size=256),
    ),
    st.integers(),
    st.none(),
    st.text(max_size=10),
)


@settings(max_examples=150, deadline=None)
@given(proofs=st.lists(proof_like, max_size=5))
def test_arbitrary_proofs_never_crash_and_never_pass(proofs):
    verdicts = verify_proofs(HIDDEN, proofs)
    assert len(verdicts) == 3
    assert not all_ok(verdicts)
    assert all(v.reason for v in verdicts)


@settings(max_examples=100, deadline=None)
@given(index=st.integers(0, 2), data=st.data())
def test_one_corrupted_proof_is_rejected_alone(index, data):
    raw = bytearray(PROOFS[index])
    pos = data.draw(st.integers(2, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    proofs = list(PROOFS)
    proofs[index] = bytes(raw)
    verdicts = verify_proofs(HIDDEN, proofs)
    v = verdicts[index]
    # Any change is visible in the statistics.
    assert v.exp_mismatches > 0 or v.mant_err_mean > 0 or v.reason.startswith("malformed")
    # A changed coefficient of x^j (j >= 1), or the high byte of the constant, moves the
    # polynomial by a random amount at nearly every point. Only the constant's low byte moves
    # every value by the same few mantissa steps, inside the published tolerance.
    if pos != 3:
        assert not v.ok
    assert all(v.ok for i, v in enumerate(verdicts) if i != index)


def test_bad_hidden_is_a_programming_error():
    import pytest

    with pytest.raises(ValueError):
        verify_proofs(HIDDEN[0], PROOFS)


def test_many_cases_at_once_get_the_verdicts_each_gets_alone():
    short = torch.randn(6, 256, generator=G)  # one chunk of 6 rows, like HIDDEN's last
    noisy = HIDDEN * (1 + 1e-2 * torch.randn(HIDDEN.shape, generator=G))
    tampered = list(PROOFS)
    tampered[1] = build_proofs(torch.randn(32, 256, generator=G))[0]
    cases = [
        (HIDDEN, PROOFS),  # honest
        (noisy, PROOFS),  # within tolerance
        (short, build_proofs(short)),  # another length: its chunk joins HIDDEN's last ones
        (HIDDEN, tampered),  # the second chunk's proof is for other states
        (HIDDEN, PROOFS[:2]),  # a proof missing
        (HIDDEN, "not a list"),
        (short, [b"junk"]),  # malformed
        (torch.randn(HIDDEN.shape, generator=G), PROOFS),  # other states
    ]
    many = verify_proofs_many(cases)
    assert many == [verify_proofs(h, p) for h, p in cases]
    assert [all_ok(v) for v in many] == [True, True, True, False, False, False, False, False]
    assert [v.ok for v in many[3]] == [True, False, True]


def test_row_statistics_match_a_direct_computation():
    import numpy as np

    rng = np.random.default_rng(3)
    # Close patterns (same exponents mostly), far ones, and a row with no exponent match.
    actual = rng.integers(0x3F00, 0x4100, size=(40, 17))
    claimed = actual + rng.integers(-300, 300, size=actual.shape)
    claimed[5] = actual[5] ^ 0x4000
    for row, got in zip(range(40), compare_bits_rows(claimed, actual), strict=True):
        c, a = claimed[row], actual[row]
        match = ((c >> 7) & 0xFF) == ((a >> 7) & 0xFF)
        errs = np.abs((c & 0x7F) - (a & 0x7F))[match]
        want = (
            int((~match).sum()),
            int(((c >> 15) != (a >> 15))[match].sum()),
            float(errs.mean()) if errs.size else math.inf,
            float(np.median(errs)) if errs.size else math.inf,
        )
        assert got == want
