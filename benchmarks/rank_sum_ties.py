"""How far scipy's normal approximation of the Mann–Whitney p is from the exact one with ties.

Why: scipy's default p with a tied value is the normal approximation at every group size, and so
was the cohort report's until it computed the exact p conditional on the ties for up to 66 patients
(:func:`reporting.cohort.ranktests.rank_sum_exact_p`); this prints what that changes at the paper's
group sizes (FNF 6 vs ITF 12 pooled; within women 2 vs 10, within men 4 vs 2) and a few larger
ones. For each tie pattern and pair of group sizes, ``--samples`` samples with at least one tie:
the largest |p_normal − p_exact|, the median and largest relative error where 0.005 < p_exact <
0.1, and how many samples the two put on different sides of 0.05: ``missed``, exact p below 0.05
and the normal one not; ``spurious``, the other way round. ``--timing`` prints the exact
p's cost per row instead (the largest split, 33 against 33, sets the 66-patient limit's price).

    .venv/bin/python benchmarks/rank_sum_ties.py --samples 3000
    .venv/bin/python benchmarks/rank_sum_ties.py --timing
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import mannwhitneyu

from reporting.cohort.ranktests import rank_sum_exact_p

SIZES = ((6, 12), (2, 10), (4, 2), (9, 12), (20, 20), (33, 33))
TIMED = ((6, 12), (9, 12), (20, 20), (8, 58), (33, 33))


@dataclass(frozen=True)
class Pattern:
    """A way loss ratios come out tied: its name and a generator of one group's m values (%)."""

    name: str
    draw: Callable[[np.random.Generator, int, float], np.ndarray]
    share_one: bool = False  # continuous values, one of the first group's copied into the second


PATTERNS = (
    Pattern("whole percent (many ties)", lambda rng, m, mean: np.rint(rng.normal(mean, 10.0, m))),
    Pattern("one value in both groups", lambda rng, m, mean: rng.normal(mean, 10.0, m), True),
    Pattern("rounded to 0.5 % (a few)", lambda rng, m, mean: np.round(rng.normal(mean, 10.0, m) * 2) / 2),
)


def _draw(rng: np.random.Generator, pattern: Pattern, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """FNF-like and ITF-like loss ratios (means 30 and 38 %, as the paper's groups differ)."""
    a, b = pattern.draw(rng, m, 30.0), pattern.draw(rng, n, 38.0)
    if pattern.share_one:
        b[0] = a[0]
    return a, b


def _tied(a: np.ndarray, b: np.ndarray) -> bool:
    pooled = np.concatenate([a, b])
    return np.unique(pooled).size < pooled.size


def accuracy(samples: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    print(f"{'pattern':26} {'sizes':>6} {'max|Δp|':>8} {'rel med':>8} {'rel max':>8} {'missed':>7} "
          f"{'spurious':>8}")
    for pattern in PATTERNS:
        for m, n in SIZES:
            gaps, rel, missed, spurious, k = [], [], 0, 0, 0
            while k < samples:
                a, b = _draw(rng, pattern, m, n)
                if not _tied(a, b):
                    continue
                k += 1
                exact = rank_sum_exact_p(a, b)
                normal = mannwhitneyu(a, b, alternative="two-sided", method="asymptotic").pvalue
                gaps.append(abs(normal - exact))
                if 0.005 < exact < 0.1:
                    rel.append(abs(normal / exact - 1))
                missed += exact < 0.05 <= normal
                spurious += normal < 0.05 <= exact
            med, top = (f"{np.median(rel):8.1%}", f"{max(rel):8.1%}") if rel else (f"{'-':>8}",) * 2
            print(f"{pattern.name:26} {f'{m}v{n}':>6} {max(gaps):8.4f} {med} {top} {missed:7d} "
                  f"{spurious:8d}")


def timing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    print(f"{'sizes':>6} {'ms per p':>9}")
    for m, n in TIMED:
        a, b = _draw(rng, PATTERNS[0], m, n)
        reps = 20
        start = time.perf_counter()
        for _ in range(reps):
            rank_sum_exact_p(a, b)
        print(f"{f'{m}v{n}':>6} {(time.perf_counter() - start) / reps * 1e3:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000, help="tied samples per pattern and sizes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timing", action="store_true", help="time the exact p instead")
    args = parser.parse_args()
    if args.timing:
        timing(args.seed)
    else:
        accuracy(args.samples, args.seed)


if __name__ == "__main__":
    main()
