"""Baseline characteristics ("Table 0"): who the included patients are, per sex × fracture group.

Why: a cohort paper describes its groups before it compares them (age, height, follow-up interval,
pre-fracture ambulation, side, muscle volume at baseline), and unequal groups explain differences
that look like findings. Input: the per-patient frame of :func:`reporting.cohort.collect.collect`
(columns ``group``, ``age_years``, ``height_m``, ``height_source``, ``days_between``,
``koval_grade``, ``fractured_side``, ``pre_cm3`` = the 21 analysed muscles before surgery).

Output (:func:`baseline_table`): one row per characteristic (:data:`ROWS`), one column per group
of :data:`reporting.cohort.collect.GROUPS` and ``All``; each cell is the text a reader sees (a
median with its interquartile range as ``median [Q1–Q3]``, counts as ``a / b / c``), "–" when no
patient of the group has the value. Quartiles are numpy's linear percentiles (as Table 2's).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from reporting.cohort.collect import GROUPS

ALL = "All"
KOVAL_CLASSES = (  # Koval's grades as the paper groups them
    ("community ambulatory (Koval 1–3)", range(1, 4)),
    ("household ambulatory (Koval 4–6)", range(4, 7)),
    ("non-functional ambulatory (Koval 7)", range(7, 8)),
)
AGE = "age at baseline CT, years, median [IQR]"
AGE_MEAN = "age at baseline CT, years, mean ± SD"  # the paper's statistic (77.3 ± 9.73)
AGE_N = "  patients with a known age"
HEIGHT = "height, m, median [IQR]"
HEIGHT_SOURCE = "  height from registry / PatientSize / none"
DAYS = "days baseline to follow-up, median [IQR]"
KOVAL_N = "Koval grade known"
KOVAL_GRADES = "  Koval grade 1/2/3/4/5/6/7"
SIDE = "fractured side left / right / unknown"
PRE_VOLUME = "pre-operative volume, 21 muscles, cm³, median [IQR]"
PRE_INDEX = "pre-operative volume / height², cm³/m², median [IQR]"
ROWS = ("n", AGE, AGE_MEAN, AGE_N, HEIGHT, HEIGHT_SOURCE, DAYS, KOVAL_N, *(name for name, _ in KOVAL_CLASSES),
        KOVAL_GRADES, SIDE, PRE_VOLUME, PRE_INDEX)


def median_iqr(values: pd.Series, digits: int) -> str:
    """``median [Q1–Q3]`` of the values present, "–" when there are none."""
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if v.size == 0:
        return "–"
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return f"{med:.{digits}f} [{q1:.{digits}f}–{q3:.{digits}f}]"


def mean_sd(values: pd.Series, digits: int) -> str:
    """``mean ± SD`` (sample SD, ddof 1) of the values present; the mean alone for one value, "–"
    for none. Why beside the median: the paper reports its ages so, and a manuscript compares."""
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if v.size == 0:
        return "–"
    if v.size == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _counts(values: pd.Series, keys: tuple[object, ...], rest: bool = False) -> str:
    """``a / b / …``: how many values equal each key (and, with ``rest``, how many equal none)."""
    cells = [int((values == k).sum()) for k in keys]
    if rest:
        cells.append(len(values) - sum(cells))
    return " / ".join(str(c) for c in cells)


def _grades(p: pd.DataFrame) -> pd.Series:
    return pd.to_numeric(p["koval_grade"], errors="coerce")


def _column(p: pd.DataFrame) -> dict[str, str]:
    """One group's cells (``p``: its patients)."""
    grades = _grades(p)
    known = grades.dropna()
    index = p["pre_cm3"] / p["height_m"] ** 2
    cells: dict[str, Callable[[], str]] = {
        "n": lambda: str(len(p)),
        AGE: lambda: median_iqr(p["age_years"], 1),
        AGE_MEAN: lambda: mean_sd(p["age_years"], 1),
        AGE_N: lambda: f"{int(p['age_years'].notna().sum())} of {len(p)}",
        HEIGHT: lambda: median_iqr(p["height_m"], 2),
        HEIGHT_SOURCE: lambda: " / ".join(str(c) for c in (
            int(((p["height_source"] == "registry") & p["height_m"].notna()).sum()),
            int(((p["height_source"] == "PatientSize") & p["height_m"].notna()).sum()),
            int(p["height_m"].isna().sum()),
        )),
        DAYS: lambda: median_iqr(p["days_between"], 0),
        KOVAL_N: lambda: f"{known.size} of {len(p)}",
        KOVAL_GRADES: lambda: _counts(known, tuple(range(1, 8))),
        SIDE: lambda: _counts(p["fractured_side"], ("left", "right"), rest=True),
        PRE_VOLUME: lambda: median_iqr(p["pre_cm3"], 0),
        PRE_INDEX: lambda: median_iqr(index, 1),
    }
    for name, grade_range in KOVAL_CLASSES:
        cells[name] = lambda r=grade_range: str(int(known.isin(list(r)).sum()))
    return {row: cells[row]() for row in ROWS}


def baseline_table(patients: pd.DataFrame) -> pd.DataFrame:
    """Table 0: :data:`ROWS` × (each group of :data:`GROUPS`, an empty one with n = 0, then ``All``)."""
    if patients.empty:
        return pd.DataFrame()
    columns = {g: _column(patients[patients["group"] == g]) for g in GROUPS}
    columns[ALL] = _column(patients)
    t = pd.DataFrame(columns).reindex(list(ROWS))
    t.index.name = "characteristic"
    return t
