from math import comb

import pytest

from trainer.passk import PassAtKError, mean_pass_at_k, pass_at_k


def test_hand_computed_values():
    assert pass_at_k(2, 1, 1) == 0.5
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 0, 1) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 8, 8) == 1.0
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # one correct of n with k=n: always found
    assert pass_at_k(8, 1, 8) == 1.0


def test_pass_at_1_is_the_fraction_correct():
    for n, c in [(8, 3), (10, 7), (1, 1), (3, 0)]:
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_product_form_matches_binomials_and_stays_finite_for_large_n():
    for n, c, k in [(20, 3, 5), (16, 9, 4), (30, 1, 10)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    big = pass_at_k(5000, 2, 100)  # C(5000, 100) overflows a float
    assert big == pytest.approx(1 - comb(4998, 100) / comb(5000, 100))


def test_mean_over_prompts():
    assert mean_pass_at_k([(2, 1), (2, 0), (2, 2)], 1) == pytest.approx(0.5)
    assert mean_pass_at_k([(4, 1), (4, 0)], 2) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "n, c, k, words",
    [
        (4, 1, 8, "at least 8 samples"),
        (4, 5, 2, "between 0 and 4"),
        (4, -1, 1, "between"),
        (4, 1, 0, "at least 1"),
    ],
)
def test_bad_counts_are_refused(n, c, k, words):
    with pytest.raises(PassAtKError, match=words):
        pass_at_k(n, c, k)


def test_no_prompts_is_refused():
    with pytest.raises(PassAtKError):
        mean_pass_at_k([], 1)
