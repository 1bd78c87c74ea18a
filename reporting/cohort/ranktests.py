"""The cohort's two rank tests, with the way each p-value is computed chosen here and named.

Why: a methods section must say whether a p is exact or a normal approximation, and scipy's
``method="auto"`` picks one without saying which (and its rule has changed between releases). The
rule below is scipy 1.17's "auto", written out and passed to scipy explicitly, so the p-values are
the ones scipy gives by default and each row's label is true by construction:

- Wilcoxon signed-rank (paired; zero differences dropped, scipy's ``zero_method="wilcox"``): exact
  null distribution for n ≤ 50 pairs with no tied and no zero differences; otherwise, for n ≤ 13,
  every one of the 2ⁿ sign assignments is counted (exact, too); otherwise the normal approximation
  (tie-corrected, no continuity correction: scipy's default).
- Mann–Whitney U: exact null distribution when the smaller group has at most 8 patients and no
  value ties; otherwise the normal approximation (tie- and continuity-corrected).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import scipy
from scipy.stats import PermutationMethod, mannwhitneyu, wilcoxon

EXACT_SIGNED_RANK_MAX_N = 50  # scipy's limit for its exact signed-rank distribution
ENUMERATED_SIGNED_RANK_MAX_N = 13  # 2¹³ = 8192 sign assignments: all counted, no sampling
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
    normal: str  # which corrections its normal approximation applies


SIGNED_RANK = TestKind("two-sided Wilcoxon signed-rank test (zero differences dropped)",
                       "tie-corrected, no continuity correction")
RANK_SUM = TestKind("two-sided Mann–Whitney U test", "tie- and continuity-corrected")


def _has_ties(values: np.ndarray) -> bool:
    return np.unique(values).size < values.size


def signed_rank(x: np.ndarray, y: np.ndarray) -> RankTest:
    """Wilcoxon signed-rank of the pairs (x, y); needs two non-zero differences for a p."""
    d = np.asarray(x, float) - np.asarray(y, float)
    nonzero = d[d != 0]
    if d.size <= EXACT_SIGNED_RANK_MAX_N and nonzero.size == d.size and not _has_ties(np.abs(d)):
        res, method = wilcoxon(x, y, method="exact"), PMethod.EXACT
    elif d.size <= ENUMERATED_SIGNED_RANK_MAX_N:
        res = wilcoxon(x, y, method=PermutationMethod(n_resamples=2**d.size))
        method = PMethod.EXACT
    else:
        res, method = wilcoxon(x, y, method="asymptotic"), PMethod.NORMAL
    return RankTest(float(res.statistic), float(res.pvalue), method)


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
    how = {PMethod.EXACT: "exact", PMethod.NORMAL: f"normal approximation ({kind.normal})"}
    if not count:
        parts = "none (too few patients)"
    elif len(count) == 1:
        (method, n), = count.items()
        parts = f"{how[method]} in all {n} rows" if n > 1 else f"{how[method]}"
    else:
        parts = ", ".join(f"{how[m]} in {count[m]} row{'s' * (count[m] > 1)}"
                          for m in PMethod if m in count) + " (column p_method)"
    return f"Test: {kind.name}, scipy {scipy.__version__}. p-values: {parts}."
