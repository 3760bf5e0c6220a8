"""pass@k: the chance that at least one of k samples drawn from a prompt's n is correct.

The unbiased estimator (Chen et al., 2021) for one prompt with n samples of which c are
correct is 1 - C(n-c, k) / C(n, k). The binomials overflow floats for large n, so the ratio is
taken as a product: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
"""

from __future__ import annotations

from collections.abc import Sequence


class PassAtKError(ValueError):
    """Counts that pass@k is not defined for."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one prompt with `n` samples, `c` of them correct."""
    if k < 1:
        raise PassAtKError(f"k must be at least 1, not {k}")
    if n < k:
        raise PassAtKError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if not 0 <= c <= n:
        raise PassAtKError(f"correct samples must be between 0 and {n}, got {c}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over prompts; `counts` holds (n, c) per prompt."""
    if not counts:
        raise PassAtKError("pass@k of no prompts")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
