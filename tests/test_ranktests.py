"""The exact rank-test p-values with ties (signed-rank: and zeros): against counting every sign
assignment or split, and against scipy wherever scipy's p is exact (no ties: its exact
distribution; ties: its permutation test given as many resamples as there are permutations)."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest
from scipy.stats import PermutationMethod, mannwhitneyu, rankdata, wilcoxon

from reporting.cohort.ranktests import (
    EXACT_RANK_SUM_MAX_N,
    PMethod,
    rank_sum,
    rank_sum_exact_p,
    signed_rank,
    signed_rank_exact_p,
    smallest_p,
)


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


def _enumerated_rank_sum_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Mann–Whitney p by brute force: ``a``'s rank sum (mid-ranks) for each of the C(N, m)
    choices of which m = |a| pooled values are ``a``'s, counted against the observed one."""
    ranks = rankdata(np.concatenate([a, b]))
    observed = ranks[: a.size].sum()
    sums = np.array([ranks[list(c)].sum() for c in itertools.combinations(range(ranks.size), a.size)])
    return min(1.0, 2 * min(np.mean(sums <= observed), np.mean(sums >= observed)))


def _tied_groups(rng: np.random.Generator, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two groups of a few integer values (many ties within and across them), the second shifted."""
    return rng.integers(0, 6, size=m).astype(float), rng.integers(1, 8, size=n).astype(float)


def test_rank_sum_exact_p_equals_counting_every_split() -> None:
    """Either group the smaller (the DP counts the smaller group's subsets), ties or none."""
    rng = np.random.default_rng(21)
    cases = [_tied_groups(rng, int(rng.integers(1, 8)), int(rng.integers(1, 8))) for _ in range(150)]
    cases += [(np.array([1.0, 1]), np.array([1.0, 1, 1])),  # every value tied: p = 1
              (np.array([5.0, 5, 5, 6]), np.array([1.0, 2, 2])),
              (rng.normal(size=6), rng.normal(size=12))]  # the paper's pooled sizes, no ties
    for a, b in cases:
        assert rank_sum_exact_p(a, b) == pytest.approx(_enumerated_rank_sum_p(a, b), rel=1e-12), (a, b)
    assert rank_sum_exact_p(np.array([1.0, 1]), np.array([1.0, 1, 1])) == 1.0


def test_rank_sum_exact_p_equals_scipys_where_scipys_is_exact() -> None:
    """No ties: scipy's exact distribution, up to 33 against 33. Ties: scipy's permutation test,
    which counts every split when it is given as many resamples as there are splits."""
    rng = np.random.default_rng(22)
    sizes = [(1, 1), (1, 12), (2, 10), (4, 2), (6, 12), (9, 12), (8, 30), (20, 17), (33, 33)]
    sizes += [tuple(int(k) for k in rng.integers(1, 25, size=2)) for _ in range(20)]
    for m, n in sizes:
        a, b = rng.normal(size=m), rng.normal(0.8, 1.0, size=n)
        scipys = mannwhitneyu(a, b, alternative="two-sided", method="exact").pvalue
        assert rank_sum_exact_p(a, b) == pytest.approx(scipys, rel=1e-12), (m, n)
    for m, n in [(6, 12), (2, 10), (4, 2), (9, 7)]:
        a, b = _tied_groups(rng, m, n)
        every = PermutationMethod(n_resamples=comb(m + n, m))
        scipys = mannwhitneyu(a, b, alternative="two-sided", method=every).pvalue
        assert rank_sum_exact_p(a, b) == pytest.approx(scipys, rel=1e-12), (a, b)


def test_tied_groups_up_to_66_patients_get_the_exact_p_not_scipys_normal_approximation() -> None:
    """scipy's default with a tie is its normal approximation at any size; here the p is the exact
    one, labelled so, and U is still scipy's (``a``'s)."""
    a = np.array([12.5, 30.1, 22.0, 30.1, 41.7, 18.3])  # the paper's FNF 6 against ITF 12, one tie
    b = np.array([35.2, 44.0, 30.1, 51.9, 38.8, 27.4, 46.3, 40.0, 33.3, 49.5, 29.9, 42.1])
    res = rank_sum(a, b)
    assert res.method is PMethod.EXACT
    assert res.p == pytest.approx(_enumerated_rank_sum_p(a, b), rel=1e-12)
    default = mannwhitneyu(a, b, alternative="two-sided").pvalue
    assert default == mannwhitneyu(a, b, alternative="two-sided", method="asymptotic").pvalue
    assert abs(res.p - default) > 1e-4  # so the comparison above can tell them apart
    assert res.statistic == mannwhitneyu(a, b).statistic
    rng = np.random.default_rng(23)
    for m, n in [(2, 10), (4, 2), (9, 12), (33, 33), (10, 56)]:
        a, b = _tied_groups(rng, m, n)
        res = rank_sum(a, b)
        assert res.method is PMethod.EXACT and 0 < res.p <= 1
        assert res.statistic == mannwhitneyu(a, b).statistic


def test_above_66_patients_scipys_rule() -> None:
    """Exact (scipy's) without ties and a smaller group of at most 8, else the normal approximation."""
    rng = np.random.default_rng(24)
    cases = [
        (rng.normal(size=8), rng.normal(size=59), PMethod.EXACT, "exact"),
        (rng.normal(size=9), rng.normal(size=58), PMethod.NORMAL, "asymptotic"),
        (*_tied_groups(rng, 8, 59), PMethod.NORMAL, "asymptotic"),
        (*_tied_groups(rng, 34, 33), PMethod.NORMAL, "asymptotic"),
    ]
    for a, b, method, scipy_method in cases:
        res = rank_sum(a, b)
        assert res.method is method
        assert res.p == mannwhitneyu(a, b, alternative="two-sided", method=scipy_method).pvalue
        assert res.statistic == mannwhitneyu(a, b).statistic


def test_66_patients_is_where_the_counts_stop_fitting_an_int64() -> None:
    assert EXACT_RANK_SUM_MAX_N == 66
    assert comb(66, 33) < 2**63 <= comb(67, 33)
    a, b = _tied_groups(np.random.default_rng(25), 34, 33)
    with pytest.raises(ValueError, match="overflow"):
        rank_sum_exact_p(a, b)


def _smallest_by_counting(stats: np.ndarray) -> float:
    """The smallest two-sided p over every outcome of ``stats`` (the statistic of each equally
    likely sign assignment or split), each outcome's p counted as in the tests above."""
    return min(min(1.0, 2 * min(np.mean(stats <= s), np.mean(stats >= s))) for s in np.unique(stats))


def test_smallest_p_equals_the_smallest_of_every_outcomes_p() -> None:
    """Brute force at small n, ties and zeros or none: the smallest p over every sign assignment's
    W+, and over every split's rank sum, is the result's min_p, which the observed p never beats."""
    rng = np.random.default_rng(31)
    paired = [_tied(rng, int(rng.integers(2, 13))) for _ in range(80)]
    paired += [rng.normal(size=7), np.array([1.0, 1, 1, 1, 1, 1]), np.array([2.0, -2, 0, 0, 0, 5, 5])]
    for d in paired:
        nonzero = d[d != 0]
        if nonzero.size < 2:
            continue
        ranks = rankdata(np.abs(nonzero))
        w = np.array(list(itertools.product((0.0, 1.0), repeat=nonzero.size))) @ ranks
        res = signed_rank(d, np.zeros_like(d))
        assert res.min_p == pytest.approx(_smallest_by_counting(w), rel=1e-12), d
        assert res.p >= res.min_p
    groups = [_tied_groups(rng, int(rng.integers(1, 7)), int(rng.integers(1, 8))) for _ in range(80)]
    groups += [(np.array([10.0, 20]), np.array([20.0, 30, 35, 40, 45, 50, 55, 60, 60, 70])),
               (np.array([1.0, 1]), np.array([1.0, 1, 1])), (rng.normal(size=4), rng.normal(size=2))]
    for a, b in groups:
        ranks = rankdata(np.concatenate([a, b]))
        sums = np.array([ranks[list(c)].sum()
                         for c in itertools.combinations(range(ranks.size), a.size)])
        res = rank_sum(a, b)
        assert res.min_p == pytest.approx(_smallest_by_counting(sums), rel=1e-12), (a, b)
        assert res.p >= res.min_p


def test_without_ties_smallest_p_is_the_size_rule() -> None:
    """No ties or zeros: 2/2ⁿ (signed-rank, 1 to 51 pairs, exact and normal approximation) and
    2/C(N, m) (Mann–Whitney, up to 66 patients exact, above scipy's exact or normal), the old
    rule, which smallest_p without counts gives."""
    rng = np.random.default_rng(32)
    for n in range(1, 52):
        res = signed_rank(rng.normal(size=n), np.zeros(n))
        assert res.min_p == pytest.approx(min(1.0, 2 / 2**n), rel=1e-12) == smallest_p(2**n)
    sizes = [(1, 1), (1, 3), (2, 3), (2, 10), (4, 2), (6, 12), (20, 17), (33, 33), (8, 59), (9, 58)]
    for m, n in sizes:
        res = rank_sum(rng.normal(size=m), rng.normal(size=n))
        assert res.min_p == pytest.approx(min(1.0, 2 / comb(m + n, m)), rel=1e-12)
        assert res.min_p == smallest_p(comb(m + n, m))


def test_ties_raise_the_smallest_p_where_an_extreme_is_shared() -> None:
    """Mann–Whitney, 2 against 10: 2/66 = 0.03 without ties; with the second-lowest and the
    second-highest values tied with the next, each extreme is two splits' (4/66 = 0.06), and a p
    below 0.05 is out of reach. Signed-rank: tied differences share no extreme (W+ = 0 and W+ = all
    are one assignment each), so only zero differences raise it, by leaving fewer non-zero ones."""
    a, b = np.array([10.0, 20]), np.array([20.0, 30, 35, 40, 45, 50, 55, 60, 60, 70])
    assert rank_sum(a, b).min_p == pytest.approx(4 / 66) and rank_sum(a, b).p == pytest.approx(4 / 66)
    assert rank_sum(a, b + np.arange(1, 11) * 1e-3).min_p == pytest.approx(2 / 66)  # untied
    assert signed_rank(np.array([1.0, 1, 1, 2, 2, 3]), np.zeros(6)).min_p == 2 / 2**6
    assert signed_rank(np.array([1.0, 1, 1, 2, 2, 0]), np.zeros(6)).min_p == 2 / 2**5
    assert smallest_p(66, np.array([0, 2, 5, 0, 40, 17, 2, 0])) == pytest.approx(4 / 66)
