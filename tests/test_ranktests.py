"""The exact signed-rank p with ties and zeros: against counting every sign assignment, and against
scipy wherever scipy's p is exact (no ties: its exact distribution; ties up to 13 pairs: its
permutation test over all 2ⁿ assignments)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import PermutationMethod, rankdata, wilcoxon

from reporting.cohort.ranktests import PMethod, signed_rank, signed_rank_exact_p


def _enumerated_p(d: np.ndarray) -> float:
    """Two-sided p by brute force: W+ of each of the 2ⁿ sign assignments of the non-zero |d|'s
    mid-ranks, counted against the observed W+."""
    nonzero = d[d != 0]
    ranks = rankdata(np.abs(nonzero))
    observed = ranks[nonzero > 0].sum()
    signs = np.array(list(itertools.product((0.0, 1.0), repeat=nonzero.size)))
    w = signs @ ranks
    # mid-ranks are halves: sums of them compare exactly in floating point
    return min(1.0, 2 * min(np.mean(w <= observed), np.mean(w >= observed)))


def _tied(rng: np.random.Generator, n: int) -> np.ndarray:
    """n differences of a few integer values: many ties, some zeros (a muscle that did not change)."""
    return rng.integers(-4, 7, size=n).astype(float)


def test_exact_p_equals_counting_every_sign_assignment() -> None:
    rng = np.random.default_rng(11)
    cases = [_tied(rng, int(rng.integers(2, 15))) for _ in range(120)]
    cases += [np.array([1.0, 1, 1, 1]), np.array([2.0, -2, 2, -2, 0, 0]), np.array([0.0, 0, 3])]
    for d in cases:
        assert signed_rank_exact_p(d) == pytest.approx(_enumerated_p(d), rel=1e-12, abs=0), d


def test_exact_p_equals_scipys_where_scipys_is_exact() -> None:
    """No ties or zeros: scipy's exact distribution (1 to 50 pairs). Ties or zeros up to 13 pairs:
    scipy's permutation test, which then counts all 2ⁿ sign assignments."""
    rng = np.random.default_rng(12)
    for n in range(1, 51):
        d = rng.normal(size=n)
        assert signed_rank_exact_p(d) == pytest.approx(wilcoxon(d, method="exact").pvalue, rel=1e-12)
    # scipy's permutation test takes a second and a half at 13 pairs: one case of 13, the rest fewer
    for n in [13, *rng.integers(3, 11, size=20)]:
        d = _tied(rng, int(n))
        if np.count_nonzero(d) < 2:
            continue
        every = wilcoxon(d, method=PermutationMethod(n_resamples=2**n)).pvalue
        assert signed_rank_exact_p(d) == pytest.approx(every, rel=1e-12), d


def test_ties_from_14_to_50_pairs_get_the_exact_p_not_scipys_normal_approximation() -> None:
    """Where scipy's default switches to the normal approximation (ties or a zero, 14–50 pairs) the
    p is the exact one, labelled so, and the statistic is still scipy's W = min(W+, W−)."""
    # 16 pairs, one zero: enumerable, and scipy's default p is its normal approximation
    d = np.array([0.0, 1.5, -0.4, 2.2, 3.1, -1.0, 0.7, 2.8, 1.9, -0.2, 4.0, 2.5, 1.1, 3.6, 0.9, 2.0])
    res = signed_rank(d, np.zeros_like(d))
    assert res.method is PMethod.EXACT
    assert res.p == pytest.approx(_enumerated_p(d), rel=1e-12)
    assert wilcoxon(d).pvalue == pytest.approx(wilcoxon(d, method="asymptotic").pvalue)
    assert abs(res.p - wilcoxon(d).pvalue) > 1e-4  # so the comparison above can tell them apart
    assert res.statistic == wilcoxon(d).statistic
    rng = np.random.default_rng(13)
    for n in (14, 30, 50):
        x, y = rng.integers(0, 8, size=n).astype(float), rng.integers(0, 8, size=n).astype(float)
        res = signed_rank(x, y)
        assert res.method is PMethod.EXACT and 0 < res.p <= 1
        assert res.statistic == wilcoxon(x, y).statistic


def test_more_than_50_pairs_use_scipys_normal_approximation() -> None:
    rng = np.random.default_rng(14)
    x, y = rng.integers(0, 8, size=51).astype(float), rng.integers(0, 8, size=51).astype(float)
    res = signed_rank(x, y)
    assert res.method is PMethod.NORMAL
    assert res.p == wilcoxon(x, y, method="asymptotic").pvalue == wilcoxon(x, y).pvalue
    assert res.statistic == wilcoxon(x, y).statistic
