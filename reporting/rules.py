"""Reporting rules shared by every output: precision, minimum segment size, percentage floor.

Why one place: the SEG, the measurement SR, the follow-up SR and the summary page must agree on
what counts as "found" and on how a number is written, or a reader sees a segment in one object and
"not found" in another, or 41.4459556191840 cm³ next to 41.4 cm³. The voxel counts in volumes.json
and the change record stay exact; these rules apply when a number is shown or encoded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReportingRules:
    """Thresholds (cm³) and decimals of the encoded values.

    ``min_segment_cm3``: a structure (per side) smaller than this is "not found": no SEG segment, no
    volume in the SR, "–" on the summary. One voxel of a 512² CT is ~0.001 cm³ and of the demo
    phantoms 0.045–0.16 cm³; a real thigh muscle is tens to hundreds of cm³, so 1 cm³ only removes
    specks. ``pct_baseline_floor_cm3``: below this baseline volume a percentage change is not
    stated (1 → 6 voxels would read +500 %); the change in cm³ still is.
    """

    min_segment_cm3: float = 1.0
    pct_baseline_floor_cm3: float = 5.0
    volume_decimals: int = 1  # cm³: segmentation error is far above 0.1 cm³
    index_decimals: int = 2  # cm³/m²
    index_change_decimals: int = 1  # cm³/m²: a change of 0.1 cm³ (as written) moves the index ~0.04
    percent_decimals: int = 1
    height_decimals: int = 2  # m
    length_decimals: int = 1  # mm
    area_decimals: int = 1  # cm²: the largest cross-section of a segment


RULES = ReportingRules()


def rounded(value: float, decimals: int) -> float:
    """``value`` rounded for encoding as DS (``-0.0`` becomes ``0.0``, so no "-0.0" is written)."""
    return round(float(value), decimals) + 0.0


def is_found(volume_cm3: float | None, rules: ReportingRules = RULES) -> bool:
    """Is a structure (one side, or both together) large enough to be reported as found?"""
    return volume_cm3 is not None and float(volume_cm3) >= rules.min_segment_cm3


def change_pct(pre: float | None, post: float | None, rules: ReportingRules = RULES) -> float | None:
    """Signed change in % of baseline, ``(post − pre) / pre × 100`` (negative for a loss).

    ``None`` when either volume is missing or not found, or the baseline is below the floor.
    """
    if pre is None or post is None or not is_found(post, rules):
        return None
    if float(pre) < rules.pct_baseline_floor_cm3:
        return None
    return (float(post) - float(pre)) / float(pre) * 100.0


@dataclass(frozen=True)
class ShownChange:
    """A change as the outputs show it (change SR, summary page): every figure from the two volumes
    as written, so that a reader's own subtraction, percentage and index of the numbers shown agree
    with the ones stated ("0.0 cm³" never sits beside "-0.2 %"). The change record keeps the exact
    figures."""

    pre_cm3: float | None  # None: not found
    post_cm3: float | None
    delta_cm3: float | None  # None unless both are found
    change_pct: float | None  # None also below the baseline floor
    delta_index_cm3_m2: float | None  # None also without a height


def shown_change(pre: float | None, post: float | None, height_m: float | None,
                 rules: ReportingRules = RULES) -> ShownChange:
    """:class:`ShownChange` of a baseline and a follow-up volume (cm³), rounded per ``rules``."""
    d = rules.volume_decimals
    pre_s = rounded(pre, d) if pre is not None and is_found(pre, rules) else None
    post_s = rounded(post, d) if post is not None and is_found(post, rules) else None
    if pre_s is None or post_s is None:
        return ShownChange(pre_s, post_s, None, None, None)
    delta = rounded(post_s - pre_s, d)
    pct = change_pct(pre_s, post_s, rules)
    return ShownChange(pre_s, post_s, delta, None if pct is None else rounded(pct, rules.percent_decimals),
                       rounded(delta / height_m**2, rules.index_change_decimals) if height_m else None)
