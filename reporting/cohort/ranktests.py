"""The cohort's two rank tests, with the way each p-value is computed chosen here and named.

Why: a methods section must say whether a p is exact or a normal approximation, and scipy's
``method="auto"`` picks one without saying which (and its rule has changed between releases). So
each test's rule is written out here and each row's label is true by construction:

- Wilcoxon signed-rank (paired; zero differences dropped, scipy's ``zero_method="wilcox"``): exact
  for up to 50 pairs, ties and zero differences or not; otherwise the normal approximation
  (tie-corrected, no continuity correction: scipy's default). Exact is the permutation distribution
  of the sum of the positive differences' mid-ranks over all 2ⁿ sign assignments of the n non-zero
  differences, conditional on their tied ranks (:func:`signed_rank_exact_p`). Without ties or zeros
  it is scipy's exact distribution; with them scipy 1.17 counts every sign assignment only up to 13
  pairs and uses the normal approximation from 14, whose p is off by up to 0.1 at 14–20 pairs.
- Mann–Whitney U: exact for up to 66 patients in the two groups together, ties or not; above that
  exact only without ties and with at most 8 patients in the smaller group (scipy's exact
  distribution, the same one); otherwise the normal approximation (tie- and continuity-corrected).
  Exact is the permutation distribution of one group's rank sum over all C(N, m) ways to choose
  which m of the N patients form it, conditional on their tied mid-ranks
  (:func:`rank_sum_exact_p`). Without ties it is scipy's exact distribution; with them scipy 1.17's
  default is the normal approximation at every group size.

Each result also carries ``min_p``, the smallest p its test could give these data
(:func:`smallest_p`), for the tables' "cannot reach 0.05" warnings: where the p is exact, that of
the exact distribution conditional on the observed mid-ranks (zero differences dropped); where it
is the normal approximation, the size-only bound 2/2ⁿ or 2/C(N, m), ties ignored.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from math import comb

import numpy as np
import scipy
from scipy.stats import mannwhitneyu, rankdata, wilcoxon

# Exact up to 50 pairs, as scipy without ties; the counts of the 2⁵⁰ sign assignments fit an int64.
EXACT_SIGNED_RANK_MAX_N = 50
# Exact up to 66 patients: the largest N whose every split's count C(N, m) fits an int64 (C(67, 33)
# does not); at 33 against 33 the DP takes about 10 ms (benchmarks/rank_sum_ties.py --timing).
EXACT_RANK_SUM_MAX_N = 66
# Above it, scipy's exact distribution without ties (its limit; the same distribution as ours)
EXACT_RANK_SUM_MAX_SMALLER_N = 8


class PMethod(StrEnum):
    """How a p-value was computed (the ``p_method`` column of the test tables)."""

    EXACT = "exact"
    NORMAL = "normal approximation"


@dataclass(frozen=True)
class RankTest:
    """One two-sided test's statistic, p-value and how the p was computed."""

    statistic: float
    p: float
    method: PMethod
    # The smallest p these data's test could give (:func:`smallest_p`): of the exact distribution
    # conditional on the ties where the p is exact, else the size-only bound (ties ignored).
    min_p: float


@dataclass(frozen=True)
class TestKind:
    """What a table's footnote says about its test."""

    name: str  # the test as a methods section names it
    exact: str  # what its exact p is the distribution of (with ties: conditional on them)
    normal: str  # which corrections its normal approximation applies


SIGNED_RANK = TestKind("two-sided Wilcoxon signed-rank test (zero differences dropped)",
                       "all 2ⁿ sign assignments, tied differences at their mid-ranks",
                       "tie-corrected, no continuity correction")
RANK_SUM = TestKind("two-sided Mann–Whitney U test",
                    "all C(N, m) splits of the patients, tied values at their mid-ranks",
                    "tie- and continuity-corrected")


def _has_ties(values: np.ndarray) -> bool:
    return np.unique(values).size < values.size


@dataclass(frozen=True)
class _ExactNull:
    """An exact permutation distribution: ``counts[s]`` of the ``total`` equally likely sign
    assignments or splits give the doubled statistic s; ``observed`` is the data's."""

    counts: np.ndarray
    observed: int
    total: int

    def p(self) -> float:
        """2 · min(P(S ≤ observed), P(S ≥ observed)), at most 1: both tails are counted, since
        with ties the distribution need not be symmetric."""
        c, s = self.counts, self.observed
        return min(1.0, 2 * min(int(c[: s + 1].sum()), int(c[s:].sum())) / self.total)


def smallest_p(total: int, counts: np.ndarray | None = None) -> float:
    """The smallest two-sided p an exact rank test can give, over every outcome of its null
    distribution: ``total`` equally likely sign assignments or splits, ``counts[s]`` of which give
    the statistic s (None: no ties, each extreme outcome reached by one of them).

    Why one owner: the tables warn where a comparison cannot reach 0.05, and with tied mid-ranks
    several assignments share an extreme outcome, so the size-only bound 2/total (2/2ⁿ, 2/C(N, m))
    is too low. The tails are smallest at the two extremes: p = 2 · min(count at the lowest, count
    at the highest) / total.
    """
    if counts is None:
        low = high = 1
    else:
        reached = np.flatnonzero(counts)
        low, high = int(counts[reached[0]]), int(counts[reached[-1]])
    return min(1.0, 2 * min(low, high) / total)


def _signed_rank_null(d: np.ndarray) -> _ExactNull:
    """The exact distribution of the doubled W+ of the differences ``d``, conditional on their ties:
    zeros dropped, mid-ranks for tied absolute values (up to 62 non-zero differences).

    Why a DP and not enumeration: doubled mid-ranks are integers, so the number of sign assignments
    giving each doubled W+ is built one rank at a time (O(n³), under a millisecond at n = 50)
    instead of counting 2ⁿ assignments.
    """
    d = np.asarray(d, float)
    nonzero = d[d != 0]
    if nonzero.size > 62:
        raise ValueError(f"{nonzero.size} non-zero differences: the counts would overflow an int64")
    doubled = np.rint(2 * rankdata(np.abs(nonzero))).astype(np.int64)
    counts = np.zeros(int(doubled.sum()) + 1, np.int64)
    counts[0] = 1  # the empty sum, before any rank is placed
    for r in doubled:
        counts[r:] = counts[r:] + counts[:-r]  # this rank negative (unchanged) or positive (+r)
    return _ExactNull(counts, int(doubled[nonzero > 0].sum()), 2**nonzero.size)


def signed_rank_exact_p(d: np.ndarray) -> float:
    """Exact two-sided p of the Wilcoxon signed-rank test of the differences ``d``, conditional on
    their ties and zeros (:func:`_signed_rank_null`); as scipy's, at most 1."""
    return _signed_rank_null(d).p()


def signed_rank(x: np.ndarray, y: np.ndarray) -> RankTest:
    """Wilcoxon signed-rank of the pairs (x, y): W = min(W+, W−), as scipy's two-sided statistic;
    needs two non-zero differences for a p."""
    d = np.asarray(x, float) - np.asarray(y, float)
    nonzero = d[d != 0]
    if d.size > EXACT_SIGNED_RANK_MAX_N:
        res = wilcoxon(x, y, method="asymptotic")
        return RankTest(float(res.statistic), float(res.pvalue), PMethod.NORMAL,
                        smallest_p(2**nonzero.size))
    ranks = rankdata(np.abs(nonzero))
    w = min(ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum())
    null = _signed_rank_null(d)
    return RankTest(float(w), null.p(), PMethod.EXACT, smallest_p(null.total, null.counts))


def _rank_sum_null(a: np.ndarray, b: np.ndarray) -> _ExactNull:
    """The exact distribution of the smaller group's doubled rank sum over all C(N, m) ways to
    choose which m of the N pooled values form it, conditional on their ties (mid-ranks).

    Why a DP and not enumeration: doubled mid-ranks are integers, so the number of subsets of each
    size k ≤ m giving each doubled rank sum is built one value at a time (about 10 ms at 33 against
    33) instead of listing C(N, m) subsets. Counting the smaller group's subsets keeps every count
    at most C(N, m), which must fit an int64.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    doubled = np.rint(2 * rankdata(np.concatenate([a, b]))).astype(np.int64)
    small = doubled[: a.size] if a.size <= b.size else doubled[a.size:]
    n, m = doubled.size, small.size
    splits = comb(n, m)
    if splits >= 2**63:
        raise ValueError(f"C({n}, {m}) splits: the counts would overflow an int64")
    top = int(np.sort(doubled)[n - m:].sum())  # the largest doubled rank sum of m values
    counts = np.zeros((m + 1, top + 1), np.int64)  # counts[k, s]: subsets of k values summing to s
    counts[0, 0] = 1  # the empty subset, before any value is placed
    for r in doubled:
        counts[1:, r:] = counts[1:, r:] + counts[:-1, :-r]  # this value left out, or taken (+r)
    return _ExactNull(counts[m], int(small.sum()), splits)


def rank_sum_exact_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided p of the Mann–Whitney test of ``a`` against ``b``, conditional on their ties
    (:func:`_rank_sum_null`): the splits whose rank sum is at least as extreme as the one observed."""
    return _rank_sum_null(a, b).p()


def rank_sum(a: np.ndarray, b: np.ndarray) -> RankTest:
    """Mann–Whitney U of ``a`` against ``b`` (U is ``a``'s), two-sided."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size + b.size <= EXACT_RANK_SUM_MAX_N:
        u = rankdata(np.concatenate([a, b]))[: a.size].sum() - a.size * (a.size + 1) / 2
        null = _rank_sum_null(a, b)
        return RankTest(float(u), null.p(), PMethod.EXACT, smallest_p(null.total, null.counts))
    exact = (min(a.size, b.size) <= EXACT_RANK_SUM_MAX_SMALLER_N
             and not _has_ties(np.concatenate([a, b])))
    res = mannwhitneyu(a, b, alternative="two-sided", method="exact" if exact else "asymptotic")
    return RankTest(float(res.statistic), float(res.pvalue), PMethod.EXACT if exact else PMethod.NORMAL,
                    smallest_p(comb(a.size + b.size, a.size)))


def method_line(kind: TestKind, methods: list[str]) -> str:
    """The footnote a table of ``kind`` carries: the test, and how many of its p-values were
    computed which way (``methods``: the table's ``p_method`` values of the rows with a p)."""
    count = Counter(PMethod(m) for m in methods)
    how = {PMethod.EXACT: f"exact ({kind.exact})", PMethod.NORMAL: f"normal approximation ({kind.normal})"}
    if not count:
        parts = "none (too few patients)"
    elif len(count) == 1:
        (method, n), = count.items()
        parts = f"{how[method]} in all {n} rows" if n > 1 else f"{how[method]}"
    else:
        parts = ", ".join(f"{how[m]} in {count[m]} row{'s' * (count[m] > 1)}"
                          for m in PMethod if m in count) + " (column p_method)"
    return f"Test: {kind.name}, scipy {scipy.__version__}. p-values: {parts}."
