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
- Mann–Whitney U: exact null distribution when the smaller group has at most 8 patients and no
  value ties; otherwise the normal approximation (tie- and continuity-corrected): scipy 1.17's
  "auto", passed to scipy explicitly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import scipy
from scipy.stats import mannwhitneyu, rankdata, wilcoxon

# Exact up to 50 pairs, as scipy without ties; the counts of the 2⁵⁰ sign assignments fit an int64.
EXACT_SIGNED_RANK_MAX_N = 50
EXACT_RANK_SUM_MAX_SMALLER_N = 8  # scipy's limit for its exact Mann–Whitney distribution


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


@dataclass(frozen=True)
class TestKind:
    """What a table's footnote says about its test."""

    name: str  # the test as a methods section names it
    exact: str  # what its exact p is the distribution of (with ties: conditional on them)
    normal: str  # which corrections its normal approximation applies


SIGNED_RANK = TestKind("two-sided Wilcoxon signed-rank test (zero differences dropped)",
                       "all 2ⁿ sign assignments, tied differences at their mid-ranks",
                       "tie-corrected, no continuity correction")
RANK_SUM = TestKind("two-sided Mann–Whitney U test", "no tied values",
                    "tie- and continuity-corrected")


def _has_ties(values: np.ndarray) -> bool:
    return np.unique(values).size < values.size


def signed_rank_exact_p(d: np.ndarray) -> float:
    """Exact two-sided p of the Wilcoxon signed-rank test of the differences ``d``, conditional on
    their ties: zeros dropped, mid-ranks for tied absolute values (up to 62 non-zero differences).

    Why a DP and not enumeration: doubled mid-ranks are integers, so the number of sign assignments
    giving each doubled W+ is built one rank at a time (O(n³), under a millisecond at n = 50)
    instead of counting 2ⁿ assignments. p = 2 · min(P(W+ ≤ w), P(W+ ≥ w)), at most 1, as scipy's.
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
    w = int(doubled[nonzero > 0].sum())
    tail = min(int(counts[: w + 1].sum()), int(counts[w:].sum()))  # the smaller tail, w included
    return min(1.0, 2 * tail / 2**nonzero.size)


def signed_rank(x: np.ndarray, y: np.ndarray) -> RankTest:
    """Wilcoxon signed-rank of the pairs (x, y): W = min(W+, W−), as scipy's two-sided statistic;
    needs two non-zero differences for a p."""
    d = np.asarray(x, float) - np.asarray(y, float)
    if d.size > EXACT_SIGNED_RANK_MAX_N:
        res = wilcoxon(x, y, method="asymptotic")
        return RankTest(float(res.statistic), float(res.pvalue), PMethod.NORMAL)
    nonzero = d[d != 0]
    ranks = rankdata(np.abs(nonzero))
    w = min(ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum())
    return RankTest(float(w), signed_rank_exact_p(d), PMethod.EXACT)


def rank_sum(a: np.ndarray, b: np.ndarray) -> RankTest:
    """Mann–Whitney U of ``a`` against ``b`` (U is ``a``'s), two-sided."""
    exact = (min(a.size, b.size) <= EXACT_RANK_SUM_MAX_SMALLER_N
             and not _has_ties(np.concatenate([a, b])))
    res = mannwhitneyu(a, b, alternative="two-sided", method="exact" if exact else "asymptotic")
    return RankTest(float(res.statistic), float(res.pvalue), PMethod.EXACT if exact else PMethod.NORMAL)


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
