"""Cohort tables and statistics: the paper's Tables 1–3 and Figure 8's data, and the tests it lacked.

Why: Kim et al. (PeerJ 2024) compared the group means of 18 patients and ran no test (too few, they
wrote); this module recomputes the same tables for any cohort and adds Wilcoxon signed-rank (pre vs
post) and Mann–Whitney U (FNF vs ITF) per muscle with effect sizes, Benjamini–Hochberg q-values and
bootstrap confidence intervals, with small groups flagged.

Table 1's denominator is all segmented muscle (labels 1–27, as the paper's sums of ~94 % imply).
Table 2 describes each patient's total loss over the 21 analysed muscles; the paper's own Table 2
numbers match the spread of Table 3's per-muscle means more closely, so that variant is computed
too (:func:`table2_across_muscles`). Input: the frames of :func:`reporting.cohort.collect.collect`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from reporting.cohort.collect import FRACTURES, GROUPS, MUSCLE_ORDER, SEX_NAME, TABLE1_GROUPS, display
from reporting.cohort.ranktests import rank_sum, signed_rank

SMALL_N = 6  # below this an exact two-sided Wilcoxon p cannot fall below 0.05
# No bootstrap interval below this n: a nominal 95 % percentile bootstrap of a mean covers the true
# mean ~50 % of the time at n = 2 (it is then just min..max) and ~80 % at n = 4 (normal data), so it
# is no CI. It is the small-group size, so an empty interval is exactly a row flagged ``small_group``.
MIN_CI_N = SMALL_N
DESCRIBE_ROWS = ("n", "Mean", "Std", "Max", "75%", "50%", "25%", "Min")  # the paper's Table 2 row order
TOTAL = "Total (21 muscles)"
# The paper variant of Table 2 describes 21 per-muscle means: its count is of muscles, and the
# patients behind each mean are a second count, so neither reads as the other (nor as Table 2's n).
N_MUSCLES = "n muscles"
N_PATIENTS = "n patients"
COUNT_ROWS = ("n", N_MUSCLES, N_PATIENTS)  # rows of counts: written as integers
ACROSS_MUSCLES_ROWS = (N_MUSCLES, N_PATIENTS, *DESCRIBE_ROWS[1:])
TABLE3_MEASURES = (
    ("Raw loss (cm³)", "loss_cm3"),
    ("Adjusted loss (cm³/m²)", "loss_index_cm3_m2"),
    ("Loss ratio (%)", "loss_pct"),
)


# ---------------------------------------------------------------- tables


def _describe(values: pd.Series) -> dict[str, float]:
    v = values.dropna().to_numpy(dtype=float)
    if v.size == 0:
        return {k: (0 if k == "n" else np.nan) for k in DESCRIBE_ROWS}
    return {
        "n": int(v.size),
        "Mean": v.mean(),
        "Std": v.std(ddof=1) if v.size > 1 else np.nan,
        "Max": v.max(),
        "75%": np.percentile(v, 75),
        "50%": np.percentile(v, 50),
        "25%": np.percentile(v, 25),
        "Min": v.min(),
    }


def _patients_with(long: pd.DataFrame, col: str) -> pd.Series:
    """Per group, how many patients have a value of ``col`` (an adjusted figure needs a height)."""
    known = long.dropna(subset=[col]).drop_duplicates(["patient_id", "issuer_of_patient_id"])
    return known.groupby("group").size()


def _named_describe(t: pd.DataFrame, rows: tuple[str, ...] = DESCRIBE_ROWS) -> pd.DataFrame:
    """Table 2's layout with its axes named, so the CSV's index column has a header."""
    t = t.reindex(list(rows))
    t.index.name = "statistic"
    t.columns = pd.MultiIndex.from_tuples(t.columns, names=["measure", "group"])
    return t


def table1(long: pd.DataFrame) -> pd.DataFrame:
    """Pre-operative composition: mean % of total muscle volume per muscle, by group, plus the sum;
    the first row, ``n``, is the patients each group's means rest on."""
    t = long.pivot_table(index="muscle", columns="group", values="pre_share_pct", aggfunc="mean")
    t = t.reindex(index=list(MUSCLE_ORDER), columns=[g for g in TABLE1_GROUPS if g in t.columns])
    t.loc["Sum"] = t.sum()
    t.index = pd.Index([display(m) if m != "Sum" else m for m in t.index], name="muscle")
    n = _patients_with(long, "pre_share_pct").reindex(t.columns).fillna(0).rename("n").to_frame().T
    return pd.concat([n, t]).rename_axis("muscle")


def table2(patients: pd.DataFrame) -> pd.DataFrame:
    """Total loss per patient described by group: raw (cm³) and height²-adjusted (cm³/m²)."""
    cols = {}
    for kind, col in (("Raw (cm³)", "loss_cm3"), ("Adjusted (cm³/m²)", "loss_index_cm3_m2")):
        for g in GROUPS:
            cols[(kind, g)] = _describe(patients.loc[patients["group"] == g, col])
    return _named_describe(pd.DataFrame(cols))


def table2_across_muscles(long: pd.DataFrame) -> pd.DataFrame:
    """The paper's apparent Table 2: the spread of the 21 per-muscle mean losses within each group.

    Its count is ``n muscles`` (21), not Table 2's ``n`` (patients); ``n patients`` says how many
    patients each per-muscle mean rests on (an adjusted one needs a height).
    """
    cols = {}
    for kind, col in (("Raw (cm³)", "loss_cm3"), ("Adjusted (cm³/m²)", "loss_index_cm3_m2")):
        means = long.groupby(["group", "muscle"])[col].mean()
        patients = _patients_with(long, col)
        for g in GROUPS:
            stats = _describe(means[g] if g in means.index.get_level_values(0) else pd.Series([]))
            cols[(kind, g)] = {N_MUSCLES: stats.pop("n"), N_PATIENTS: int(patients.get(g, 0))} | stats
    return _named_describe(pd.DataFrame(cols), ACROSS_MUSCLES_ROWS)


def table3(long: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """Per-muscle mean loss by group: raw, height²-adjusted and loss ratio (%); last column the total.

    The first column, ``n``, is the patients a row rests on: fewer in an adjusted row than in its raw
    row when a height is missing (:func:`table3_short_cells` names a muscle that rests on fewer).
    """
    rows = {}
    for kind, col in TABLE3_MEASURES:
        means = long.groupby(["group", "muscle"])[col].mean()
        tot = patients.groupby("group")[col].mean()
        counts = patients.groupby("group")[col].count()
        for g in GROUPS:
            if g not in tot.index:
                continue
            row = {"n": counts[g]} | {display(m): means.get((g, m), np.nan) for m in MUSCLE_ORDER}
            row[TOTAL] = tot[g]
            rows[(kind, g)] = row
    t = pd.DataFrame(rows).T
    t.index = pd.MultiIndex.from_tuples(t.index, names=["measure", "group"])
    return t


@dataclass(frozen=True)
class ShortCell:
    """A muscle's figure in one group that rests on fewer patients than the group has (a loss ratio
    needs a baseline volume above 0 cm³; an adjusted loss a height)."""

    group: str
    muscle: str  # the internal name; display() for people
    n: int
    of: int


def short_cells(long: pd.DataFrame, patients: pd.DataFrame, by: str, col: str) -> list[ShortCell]:
    """The muscles whose ``col`` rests on fewer patients, in a group of ``by`` ("group" or
    "fracture_type"), than that group's patients with the total's ``col``; usually none."""
    row_n = patients.groupby(by)[col].count()
    return [ShortCell(str(g), str(m), int(n), int(row_n[g]))
            for (g, m), n in long.groupby([by, "muscle"])[col].count().items()
            if n < row_n.get(g, 0)]


def short_note(where: str, cell: ShortCell) -> str:
    """One note line for a short cell: "Figure 8, FNF: Piriformis rests on 11 of 12 patients"."""
    return f"{where}, {cell.group}: {display(cell.muscle)} rests on {cell.n} of {cell.of} patients"


def table3_short_cells(long: pd.DataFrame, patients: pd.DataFrame) -> list[str]:
    """Table 3's cells that rest on fewer patients than their row's ``n``, one line each."""
    return [short_note(f"Table 3, {kind}", c)
            for kind, col in TABLE3_MEASURES for c in short_cells(long, patients, "group", col)]


def figure8_short_bars(long: pd.DataFrame, patients: pd.DataFrame) -> list[ShortCell]:
    """Figure 8's bars that rest on fewer patients than their fracture type's n (its legend's): a
    muscle with a 0 cm³ baseline leaves that patient out of the muscle's mean loss ratio."""
    return short_cells(long, patients, "fracture_type", "loss_pct")


def loss_ratio_by_fracture(long: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """Figure 8's data: mean loss ratio (%) per muscle, sexes merged, FNF vs ITF, then the patients
    each mean rests on (``n_FNF``, ``n_ITF``: fewer than the total's where a baseline is 0 cm³)."""
    by = ["muscle", "fracture_type"]
    t = long.groupby(by)["loss_pct"].agg(["mean", "count"]).unstack("fracture_type")
    total = patients.groupby("fracture_type")["loss_pct"].agg(["mean", "count"]).unstack()
    t.loc[TOTAL] = total.reindex(t.columns)
    fractures = [f for f in FRACTURES if f in t["mean"].columns]
    out = pd.concat([t["mean"][fractures], t["count"][fractures].add_prefix("n_")], axis=1)
    out = out.reindex([*MUSCLE_ORDER, TOTAL])
    out.index = pd.Index([display(m) if m != TOTAL else m for m in out.index], name="muscle")
    out.columns.name = None
    return out


# ---------------------------------------------------------------- statistics


def _bh(p: pd.Series) -> pd.Series:
    """Benjamini–Hochberg q-values (NaN kept)."""
    ok = p.dropna()
    if ok.empty:
        return p * np.nan
    order = ok.sort_values()
    m = len(order)
    q = (order * m / np.arange(1, m + 1)).iloc[::-1].cummin().iloc[::-1].clip(upper=1.0)
    return q.reindex(p.index)


def _with_q(t: pd.DataFrame, family: str | list[str]) -> pd.DataFrame:
    """``t`` with a ``q_bh`` column: Benjamini–Hochberg over the muscles (the total left out) of
    each group of ``family`` (a column, or several), the tests one reader compares with each other."""
    t["q_bh"] = np.nan
    for _, idx in t.groupby(family).groups.items():
        sub = t.loc[idx]
        t.loc[idx, "q_bh"] = _bh(sub.loc[sub["muscle"] != TOTAL, "p"])
    return t


def _bootstrap_mean(values: np.ndarray, rng: np.random.Generator, n_boot: int) -> tuple[float, float]:
    """Percentile 95 % interval of the mean; NaN below :data:`MIN_CI_N` values (no CI to speak of)."""
    if values.size < MIN_CI_N:
        return (np.nan, np.nan)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    means = values[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _per_muscle(long: pd.DataFrame, patients: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    out = [(display(m), long[long["muscle"] == m]) for m in MUSCLE_ORDER]
    out.append((TOTAL, patients))
    return out


def wilcoxon_table(long: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """Wilcoxon signed-rank of pre vs post per muscle, in all patients and per fracture type.

    Effect size: matched-pairs rank-biserial r = (W+ − W−) / (W+ + W−), positive = volume lost.
    ``p_method`` says how each p was computed (:mod:`.ranktests`).
    """
    from scipy.stats import rankdata

    rows = []
    for muscle, df in _per_muscle(long, patients):
        for subset in ("all", *FRACTURES):
            d = df if subset == "all" else df[df["fracture_type"] == subset]
            diff = (d["pre_cm3"] - d["post_cm3"]).to_numpy(dtype=float)
            n = int(diff.size)
            row = {
                "muscle": muscle,
                "patients": subset,
                "n": n,
                "median_loss_cm3": np.median(diff) if n else np.nan,
            }
            nz = diff[diff != 0]
            if nz.size >= 2:
                ranks = rankdata(np.abs(nz))
                w_plus, w_minus = ranks[nz > 0].sum(), ranks[nz < 0].sum()
                res = signed_rank(d["pre_cm3"].to_numpy(float), d["post_cm3"].to_numpy(float))
                row.update(
                    W=res.statistic,
                    p=res.p,
                    p_method=res.method.value,
                    min_p=res.min_p,
                    rank_biserial_r=float((w_plus - w_minus) / (w_plus + w_minus)),
                )
            else:
                row.update(W=np.nan, p=np.nan, p_method=np.nan, min_p=np.nan, rank_biserial_r=np.nan)
            row["small_group"] = n < SMALL_N
            rows.append(row)
    return _with_q(pd.DataFrame(rows), "patients")


def _mannwhitney_rows(frames: list[tuple[str, pd.DataFrame]]) -> list[dict[str, object]]:
    """One Mann–Whitney FNF vs ITF row per (muscle, measure) of ``frames`` (see :func:`mannwhitney_table`)."""
    rows: list[dict[str, object]] = []
    for muscle, df in frames:
        for measure in ("loss_pct", "loss_index_cm3_m2", "loss_cm3"):
            a = df.loc[df["fracture_type"] == "FNF", measure].dropna().to_numpy(dtype=float)
            b = df.loc[df["fracture_type"] == "ITF", measure].dropna().to_numpy(dtype=float)
            row: dict[str, object] = {
                "muscle": muscle,
                "measure": measure,
                "n_FNF": a.size,
                "n_ITF": b.size,
                "median_FNF": np.median(a) if a.size else np.nan,
                "median_ITF": np.median(b) if b.size else np.nan,
            }
            if a.size and b.size:
                res = rank_sum(a, b)
                row.update(
                    U_FNF=res.statistic,
                    p=res.p,
                    p_method=res.method.value,
                    min_p=res.min_p,
                    rank_biserial_r=2 * res.statistic / (a.size * b.size) - 1,
                )
            else:
                row.update(U_FNF=np.nan, p=np.nan, p_method=np.nan, min_p=np.nan,
                           rank_biserial_r=np.nan)
            row["small_group"] = min(a.size, b.size) < SMALL_N
            rows.append(row)
    return rows


def mannwhitney_table(long: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """Mann–Whitney U, FNF vs ITF, per muscle, on the loss ratio (%), adjusted and raw loss (sexes pooled).

    Effect size: rank-biserial r = 2·U_FNF / (n_FNF·n_ITF) − 1 (positive = FNF lost more).
    """
    return _with_q(pd.DataFrame(_mannwhitney_rows(_per_muscle(long, patients))), "measure")


MANNWHITNEY_SEX_COLUMNS = ("sex", "muscle", "measure", "n_FNF", "n_ITF", "median_FNF", "median_ITF",
                           "U_FNF", "p", "p_method", "min_p", "rank_biserial_r", "small_group", "q_bh")


def mannwhitney_within_sex_table(long: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """Mann–Whitney U, FNF vs ITF within women and within men (the paper's Table 3 / Figure 7 reading).

    Why: pooled, the fracture types differ in their share of women (the paper's 33 % vs 83 %), so a
    pooled difference may be one between the sexes. Columns: :data:`MANNWHITNEY_SEX_COLUMNS`; ``sex``
    is Female/Male, r as in :func:`mannwhitney_table`, q = Benjamini–Hochberg over the 21 muscles of
    each sex × measure. A sex with no patients has no rows.
    """
    rows: list[dict[str, object]] = []
    for code, name in SEX_NAME.items():
        sub_long, sub_pat = long[long["sex"] == code], patients[patients["sex"] == code]
        if sub_pat.empty:
            continue
        rows += [{"sex": name} | r for r in _mannwhitney_rows(_per_muscle(sub_long, sub_pat))]
    if not rows:
        return pd.DataFrame(columns=list(MANNWHITNEY_SEX_COLUMNS))
    return _with_q(pd.DataFrame(rows), ["sex", "measure"])[list(MANNWHITNEY_SEX_COLUMNS)]


def side_table(long: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """Operated vs contralateral side per muscle (patients with a known fractured side).

    Wilcoxon signed-rank on the paired loss ratios; rank-biserial r > 0 = the operated side lost more;
    q = Benjamini–Hochberg over the 21 muscles (the total left out), as in the other tests' tables:
    21 uncorrected p-values beside corrected ones would read as findings by chance.
    """
    from scipy.stats import rankdata

    rows = []
    for muscle, df in _per_muscle(long, patients):
        d = df.dropna(subset=["operated_loss_pct", "contralateral_loss_pct"])
        op, co = d["operated_loss_pct"].to_numpy(float), d["contralateral_loss_pct"].to_numpy(float)
        diff = op - co
        row = {
            "muscle": muscle,
            "n": int(diff.size),
            "operated_loss_pct": op.mean() if diff.size else np.nan,
            "contralateral_loss_pct": co.mean() if diff.size else np.nan,
            "difference_pct": diff.mean() if diff.size else np.nan,
            "W": np.nan,
            "p": np.nan,
            "p_method": np.nan,
            "min_p": np.nan,
            "rank_biserial_r": np.nan,
            "small_group": diff.size < SMALL_N,
        }
        nz = diff[diff != 0]
        if nz.size >= 2:
            ranks = rankdata(np.abs(nz))
            res = signed_rank(op, co)
            row.update(
                W=res.statistic,
                p=res.p,
                p_method=res.method.value,
                min_p=res.min_p,
                rank_biserial_r=float((ranks[nz > 0].sum() - ranks[nz < 0].sum()) / ranks.sum()),
            )
        rows.append(row)
    t = pd.DataFrame(rows)
    t["q_bh"] = _bh(t.loc[t["muscle"] != TOTAL, "p"])
    return t


def bootstrap_table(
    long: pd.DataFrame, patients: pd.DataFrame, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Percentile bootstrap 95 % CIs: mean loss ratio per group and fracture type, and FNF − ITF.

    Bounds are NaN where a group has fewer than :data:`MIN_CI_N` patients (those rows are flagged).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for muscle, df in _per_muscle(long, patients):
        subsets = [("group", g) for g in GROUPS] + [("fracture_type", f) for f in FRACTURES]
        for col, value in subsets:
            v = df.loc[df[col] == value, "loss_pct"].dropna().to_numpy(dtype=float)
            lo, hi = _bootstrap_mean(v, rng, n_boot)
            rows.append(
                {
                    "muscle": muscle,
                    "subset": value,
                    "n": v.size,
                    "mean_loss_pct": v.mean() if v.size else np.nan,
                    "ci95_low": lo,
                    "ci95_high": hi,
                    "small_group": v.size < SMALL_N,
                }
            )
        a = df.loc[df["fracture_type"] == "FNF", "loss_pct"].dropna().to_numpy(dtype=float)
        b = df.loc[df["fracture_type"] == "ITF", "loss_pct"].dropna().to_numpy(dtype=float)
        if min(a.size, b.size) >= MIN_CI_N:
            da = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
            db = b[rng.integers(0, b.size, size=(n_boot, b.size))].mean(axis=1)
            lo, hi = float(np.percentile(da - db, 2.5)), float(np.percentile(da - db, 97.5))
        else:
            lo = hi = np.nan
        rows.append(
            {
                "muscle": muscle,
                "subset": "FNF − ITF",
                "n": a.size + b.size,
                "mean_loss_pct": (a.mean() - b.mean()) if a.size and b.size else np.nan,
                "ci95_low": lo,
                "ci95_high": hi,
                "small_group": min(a.size, b.size) < SMALL_N,
            }
        )
    return pd.DataFrame(rows)
