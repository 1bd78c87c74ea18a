"""How far scipy's normal approximation of the Wilcoxon signed-rank p is from the exact one with ties.

Why: scipy's default p with a tie or a zero difference is exact only up to 13 pairs; from 14 it is
the normal approximation. The cohort report computes the exact p conditional on the ties up to 50
pairs (:func:`reporting.cohort.ranktests.signed_rank_exact_p`); this prints what that changes. For
each tie pattern and range of pairs, ``--samples`` samples with at least one tie or zero: the
largest |p_normal − p_exact|, the median and largest relative error where 0.005 < p_exact < 0.1,
and how many samples the two put on different sides of 0.05.

    .venv/bin/python benchmarks/signed_rank_ties.py --samples 3000
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import wilcoxon

from reporting.cohort.ranktests import signed_rank_exact_p

RANGES = ((14, 20), (21, 30), (31, 50))


@dataclass(frozen=True)
class Pattern:
    """A way differences come out tied: its name and a generator of n differences."""

    name: str
    draw: Callable[[np.random.Generator, int], np.ndarray]


PATTERNS = (
    Pattern("integer differences (many ties)", lambda rng, n: np.rint(rng.normal(1.0, 3.0, n))),
    Pattern("one zero, the rest continuous", lambda rng, n: np.r_[0.0, rng.normal(0.5, 1.0, n - 1)]),
    Pattern("rounded to 0.1 (a few ties)", lambda rng, n: np.round(rng.normal(0.5, 1.0, n), 1)),
)


def _tied(d: np.ndarray) -> bool:
    nonzero = np.abs(d[d != 0])
    return nonzero.size >= 2 and (nonzero.size < d.size or np.unique(nonzero).size < nonzero.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000, help="tied samples per pattern and range")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{'pattern':32} {'pairs':>6} {'max|Δp|':>8} {'rel med':>8} {'rel max':>8} {'0.05 flips':>11}")
    for pattern in PATTERNS:
        for lo, hi in RANGES:
            gaps, rel, flips, k = [], [], 0, 0
            while k < args.samples:
                d = pattern.draw(rng, int(rng.integers(lo, hi + 1)))
                if not _tied(d):
                    continue
                k += 1
                exact, normal = signed_rank_exact_p(d), wilcoxon(d, method="asymptotic").pvalue
                gaps.append(abs(normal - exact))
                if 0.005 < exact < 0.1:
                    rel.append(abs(normal / exact - 1))
                flips += (exact < 0.05) != (normal < 0.05)
            print(f"{pattern.name:32} {f'{lo}-{hi}':>6} {max(gaps):8.4f} {np.median(rel):8.1%} "
                  f"{max(rel):8.1%} {flips:5d}/{args.samples}")


if __name__ == "__main__":
    main()
