"""Cohort report: the paper's Tables 1–3 and Figures 6–8 for every pre/post pair the node measured.

Why: Kim et al. (PeerJ 2024) compared 18 patients by hand and could not run statistics; the node
recomputes the same tables for any cohort and adds what the paper lacked: Wilcoxon signed-rank
(pre vs post) and Mann–Whitney U (FNF vs ITF) per muscle with effect sizes, Benjamini–Hochberg
q-values and bootstrap confidence intervals, with small groups flagged.

Conventions: loss = pre − post (positive = muscle lost), cm³; adjusted loss = loss / height² (cm³/m²);
loss ratio = (pre − post) / pre × 100, averaged over patients. Volumes are both sides together.
Table 1's denominator is all segmented muscle (labels 1–27, as the paper's sums of ~94 % imply).
Table 2 describes each patient's total loss over the 21 analysed muscles; the paper's own Table 2
numbers match the spread of Table 3's per-muscle means more closely, so that variant is written
too (``table2_across_muscles``).

Input: entries as returned by :func:`dicomnode.pairing.cohort_entries` (each with a ``change``
record from :func:`reporting.change.compute_change` carrying sex and fracture_type, or a reason).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seg.labels import ANALYSED_MUSCLES, by_name

GROUPS = ("Female FNF", "Female ITF", "Male FNF", "Male ITF")  # the paper's Table 2/3 column order
TABLE1_GROUPS = ("Male FNF", "Male ITF", "Female FNF", "Female ITF")  # the paper's Table 1 column order
FRACTURES = ("FNF", "ITF")
SEX_NAME = {"F": "Female", "M": "Male"}
SMALL_N = 6  # below this an exact two-sided Wilcoxon p cannot fall below 0.05
DESCRIBE_ROWS = ("n", "Mean", "Std", "Max", "75%", "50%", "25%", "Min")  # the paper's Table 2 row order
TOTAL = "Total (21 muscles)"
GROUP_COLOURS = {
    "Female FNF": "tab:blue",
    "Male FNF": "tab:orange",
    "Female ITF": "tab:green",
    "Male ITF": "tab:red",
}
FRACTURE_COLOURS = {"FNF": "tab:red", "ITF": "tab:green"}


def display(name: str) -> str:
    return by_name(name).display_name


@dataclass
class CohortReport:
    """Every table of the report as a DataFrame plus the per-patient data they come from."""

    patients: pd.DataFrame  # one row per included patient (totals)
    long: pd.DataFrame  # one row per patient × analysed muscle
    excluded: pd.DataFrame  # patient_id, reason
    table1: pd.DataFrame
    table2: pd.DataFrame
    table2_across_muscles: pd.DataFrame
    table3: pd.DataFrame
    loss_ratio_by_fracture: pd.DataFrame  # Figure 8's data
    wilcoxon: pd.DataFrame
    mannwhitney: pd.DataFrame
    bootstrap: pd.DataFrame
    group_sizes: dict[str, int]
    notes: list[str] = field(default_factory=list)
    filters: dict[str, list[str]] = field(default_factory=dict)
    sides: pd.DataFrame = field(default_factory=pd.DataFrame)  # operated vs contralateral side


# ---------------------------------------------------------------- assembling the data


def _matches(entry: dict, filters: dict[str, list[str]]) -> bool:
    change = entry.get("change") or {}
    for key, wanted in filters.items():
        value = change.get(key, entry.get(key))
        if str(value).lower() not in {w.lower() for w in wanted}:
            return False
    return True


def parse_filters(items: list[str] | None) -> dict[str, list[str]]:
    """``["fracture_type=FNF", "sex=F,M"]`` → {"fracture_type": ["FNF"], "sex": ["F", "M"]}."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"filter {item!r} is not KEY=VALUE")
        out.setdefault(key.strip(), []).extend(v.strip() for v in value.split(",") if v.strip())
    return out


def collect(
    entries: list[dict], filters: dict[str, list[str]] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(long per-muscle table, per-patient totals, excluded with reasons) from pairing entries."""
    rows, totals, excluded = [], [], []
    for entry in entries:
        pid = entry.get("patient_id", "")
        if filters and not _matches(entry, filters):
            continue
        change = entry.get("change")
        if not change:
            excluded.append({"patient_id": pid, "reason": entry.get("reason") or "no pre/post pair"})
            continue
        if entry.get("reason"):
            excluded.append({"patient_id": pid, "reason": entry["reason"]})
            continue
        sex, fracture = change.get("sex"), change.get("fracture_type")
        if fracture not in FRACTURES:
            excluded.append(
                {"patient_id": pid, "reason": f"fracture type {fracture or 'unknown'}: not FNF/ITF"}
            )
            continue
        if sex not in SEX_NAME:
            excluded.append(
                {"patient_id": pid, "reason": "sex unknown: cannot be placed in a sex × fracture group"}
            )
            continue
        height = change.get("height_m")
        both = {s["name"]: s for s in change["structures"] if s["side"] == "both"}
        missing = [m for m in ANALYSED_MUSCLES if m not in both]
        if missing:
            excluded.append({"patient_id": pid, "reason": f"{len(missing)} analysed muscle(s) not measured"})
            continue
        all_muscle_pre = sum(s["pre_cm3"] or 0.0 for n, s in both.items() if by_name(n).is_muscle)
        group = f"{SEX_NAME[sex]} {fracture}"
        base = {
            "patient_id": pid,
            "sex": sex,
            "fracture_type": fracture,
            "group": group,
            "height_m": height,
            "days_between": change.get("days_between"),
            "koval_grade": change.get("koval_grade"),
        }
        ovc = {o["name"]: o for o in change.get("operated_vs_contralateral") or []}
        for m in ANALYSED_MUSCLES:
            s = both[m]
            loss = s["pre_cm3"] - s["post_cm3"]
            side = ovc.get(m, {})
            rows.append(
                base
                | {
                    "muscle": m,
                    "pre_cm3": s["pre_cm3"],
                    "post_cm3": s["post_cm3"],
                    "loss_cm3": loss,
                    "loss_index_cm3_m2": loss / height**2 if height else np.nan,
                    "loss_pct": loss / s["pre_cm3"] * 100.0 if s["pre_cm3"] else np.nan,
                    "pre_share_pct": s["pre_cm3"] / all_muscle_pre * 100.0 if all_muscle_pre else np.nan,
                    "operated_loss_pct": _num(side.get("operated_loss_pct")),
                    "contralateral_loss_pct": _num(side.get("contralateral_loss_pct")),
                }
            )
        pre = sum(both[m]["pre_cm3"] for m in ANALYSED_MUSCLES)
        post = sum(both[m]["post_cm3"] for m in ANALYSED_MUSCLES)
        side_loss = {"operated_loss_pct": np.nan, "contralateral_loss_pct": np.nan}
        if all(m in ovc for m in ANALYSED_MUSCLES):
            for which in ("operated", "contralateral"):
                sp = sum(ovc[m][f"{which}_pre_cm3"] or 0.0 for m in ANALYSED_MUSCLES)
                so = sum(ovc[m][f"{which}_post_cm3"] or 0.0 for m in ANALYSED_MUSCLES)
                side_loss[f"{which}_loss_pct"] = (sp - so) / sp * 100.0 if sp else np.nan
        totals.append(
            base
            | {
                "height_source": change.get("height_source"),
                "pre_cm3": pre,
                "post_cm3": post,
                "loss_cm3": pre - post,
                "loss_index_cm3_m2": (pre - post) / height**2 if height else np.nan,
                "loss_pct": (pre - post) / pre * 100.0 if pre else np.nan,
                "all_muscle_pre_cm3": all_muscle_pre,
                "fractured_side": change.get("fractured_side"),
            }
            | side_loss
        )
    long = pd.DataFrame(rows)
    patients = pd.DataFrame(totals)
    return long, patients, pd.DataFrame(excluded, columns=["patient_id", "reason"])


def _num(value: Any) -> float:
    return float(value) if value is not None else np.nan


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


def table1(long: pd.DataFrame) -> pd.DataFrame:
    """Pre-operative composition: mean % of total muscle volume per muscle, by group, plus the sum."""
    t = long.pivot_table(index="muscle", columns="group", values="pre_share_pct", aggfunc="mean")
    t = t.reindex(index=list(ANALYSED_MUSCLES), columns=[g for g in TABLE1_GROUPS if g in t.columns])
    t.loc["Sum"] = t.sum()
    t.index = [display(m) if m != "Sum" else m for m in t.index]
    return t


def table2(patients: pd.DataFrame) -> pd.DataFrame:
    """Total loss per patient described by group: raw (cm³) and height²-adjusted (cm³/m²)."""
    cols = {}
    for kind, col in (("Raw (cm³)", "loss_cm3"), ("Adjusted (cm³/m²)", "loss_index_cm3_m2")):
        for g in GROUPS:
            cols[(kind, g)] = _describe(patients.loc[patients["group"] == g, col])
    t = pd.DataFrame(cols).reindex(list(DESCRIBE_ROWS))
    t.columns = pd.MultiIndex.from_tuples(t.columns)
    return t


def table2_across_muscles(long: pd.DataFrame) -> pd.DataFrame:
    """The paper's apparent Table 2: the spread of the 21 per-muscle mean losses within each group."""
    cols = {}
    for kind, col in (("Raw (cm³)", "loss_cm3"), ("Adjusted (cm³/m²)", "loss_index_cm3_m2")):
        means = long.groupby(["group", "muscle"])[col].mean()
        for g in GROUPS:
            cols[(kind, g)] = _describe(means[g] if g in means.index.get_level_values(0) else pd.Series([]))
    t = pd.DataFrame(cols).reindex(list(DESCRIBE_ROWS))
    t.columns = pd.MultiIndex.from_tuples(t.columns)
    return t


def table3(long: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """Per-muscle mean loss by group: raw, height²-adjusted and loss ratio (%); last column the total."""
    rows = {}
    for kind, col in (
        ("Raw loss (cm³)", "loss_cm3"),
        ("Adjusted loss (cm³/m²)", "loss_index_cm3_m2"),
        ("Loss ratio (%)", "loss_pct"),
    ):
        means = long.groupby(["group", "muscle"])[col].mean()
        tot = patients.groupby("group")[col].mean()
        for g in GROUPS:
            if g not in tot.index:
                continue
            row = {display(m): means.get((g, m), np.nan) for m in ANALYSED_MUSCLES}
            row[TOTAL] = tot[g]
            rows[(kind, g)] = row
    t = pd.DataFrame(rows).T
    t.index = pd.MultiIndex.from_tuples(t.index, names=["measure", "group"])
    return t


def loss_ratio_by_fracture(long: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """Figure 8's data: mean loss ratio (%) per muscle, sexes merged, FNF vs ITF."""
    t = long.pivot_table(index="muscle", columns="fracture_type", values="loss_pct", aggfunc="mean")
    t = t.reindex(index=list(ANALYSED_MUSCLES), columns=[f for f in FRACTURES if f in t.columns])
    t.index = [display(m) for m in t.index]
    t.loc[TOTAL] = patients.groupby("fracture_type")["loss_pct"].mean().reindex(t.columns)
    return t


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


def _bootstrap_mean(values: np.ndarray, rng: np.random.Generator, n_boot: int) -> tuple[float, float]:
    if values.size < 2:
        return (np.nan, np.nan)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    means = values[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _per_muscle(long: pd.DataFrame, patients: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    out = [(display(m), long[long["muscle"] == m]) for m in ANALYSED_MUSCLES]
    out.append((TOTAL, patients))
    return out


def wilcoxon_table(long: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """Wilcoxon signed-rank of pre vs post per muscle, in all patients and per fracture type.

    Effect size: matched-pairs rank-biserial r = (W+ − W−) / (W+ + W−), positive = volume lost.
    """
    from scipy.stats import rankdata, wilcoxon

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
                res = wilcoxon(d["pre_cm3"], d["post_cm3"])
                row.update(
                    W=float(res.statistic),
                    p=float(res.pvalue),
                    rank_biserial_r=float((w_plus - w_minus) / (w_plus + w_minus)),
                )
            else:
                row.update(W=np.nan, p=np.nan, rank_biserial_r=np.nan)
            row["small_group"] = n < SMALL_N
            rows.append(row)
    t = pd.DataFrame(rows)
    t["q_bh"] = np.nan
    for _, idx in t.groupby("patients").groups.items():
        sub = t.loc[idx]
        t.loc[idx, "q_bh"] = _bh(sub.loc[sub["muscle"] != TOTAL, "p"])
    return t


def mannwhitney_table(long: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """Mann–Whitney U, FNF vs ITF, per muscle, on the loss ratio (%) and the adjusted loss.

    Effect size: rank-biserial r = 2·U_FNF / (n_FNF·n_ITF) − 1 (positive = FNF lost more).
    """
    from scipy.stats import mannwhitneyu

    rows = []
    for muscle, df in _per_muscle(long, patients):
        for measure in ("loss_pct", "loss_index_cm3_m2", "loss_cm3"):
            a = df.loc[df["fracture_type"] == "FNF", measure].dropna().to_numpy(dtype=float)
            b = df.loc[df["fracture_type"] == "ITF", measure].dropna().to_numpy(dtype=float)
            row = {
                "muscle": muscle,
                "measure": measure,
                "n_FNF": a.size,
                "n_ITF": b.size,
                "median_FNF": np.median(a) if a.size else np.nan,
                "median_ITF": np.median(b) if b.size else np.nan,
            }
            if a.size and b.size:
                res = mannwhitneyu(a, b, alternative="two-sided")
                row.update(
                    U_FNF=float(res.statistic),
                    p=float(res.pvalue),
                    rank_biserial_r=float(2 * res.statistic / (a.size * b.size) - 1),
                )
            else:
                row.update(U_FNF=np.nan, p=np.nan, rank_biserial_r=np.nan)
            row["small_group"] = min(a.size, b.size) < SMALL_N
            rows.append(row)
    t = pd.DataFrame(rows)
    t["q_bh"] = np.nan
    for _, idx in t.groupby("measure").groups.items():
        sub = t.loc[idx]
        t.loc[idx, "q_bh"] = _bh(sub.loc[sub["muscle"] != TOTAL, "p"])
    return t


def side_table(long: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """Operated vs contralateral side per muscle (patients with a known fractured side).

    Wilcoxon signed-rank on the paired loss ratios; rank-biserial r > 0 = the operated side lost more.
    """
    from scipy.stats import rankdata, wilcoxon

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
            "rank_biserial_r": np.nan,
            "small_group": diff.size < SMALL_N,
        }
        nz = diff[diff != 0]
        if nz.size >= 2:
            ranks = rankdata(np.abs(nz))
            res = wilcoxon(op, co)
            row.update(
                W=float(res.statistic),
                p=float(res.pvalue),
                rank_biserial_r=float((ranks[nz > 0].sum() - ranks[nz < 0].sum()) / ranks.sum()),
            )
        rows.append(row)
    return pd.DataFrame(rows)


def bootstrap_table(
    long: pd.DataFrame, patients: pd.DataFrame, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Percentile bootstrap 95 % CIs: mean loss ratio per group and fracture type, and FNF − ITF."""
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
        if a.size >= 2 and b.size >= 2:
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


# ---------------------------------------------------------------- the report


def build_cohort(
    entries: list[dict], filters: dict[str, list[str]] | None = None, n_boot: int = 2000, seed: int = 0
) -> CohortReport:
    """All tables and statistics for the pairs in ``entries`` (optionally filtered)."""
    filters = filters or {}
    long, patients, excluded = collect(entries, filters)
    notes: list[str] = []
    if patients.empty:
        empty = pd.DataFrame()
        return CohortReport(
            patients,
            long,
            excluded,
            empty,
            empty,
            empty,
            empty,
            empty,
            empty,
            empty,
            empty,
            {g: 0 for g in GROUPS},
            ["no pre/post pairs with a known sex and FNF/ITF fracture type"],
            filters,
        )
    sizes = {g: int((patients["group"] == g).sum()) for g in GROUPS}
    for g, n in sizes.items():
        if 0 < n < SMALL_N:
            notes.append(f"{g}: n = {n} — small group, statistics are descriptive only")
    no_height = int(patients["height_m"].isna().sum())
    if no_height:
        notes.append(
            f"{no_height} patient(s) without a plausible height: left out of the adjusted (cm³/m²) figures"
        )
    return CohortReport(
        patients=patients,
        long=long,
        excluded=excluded,
        table1=table1(long),
        table2=table2(patients),
        table2_across_muscles=table2_across_muscles(long),
        table3=table3(long, patients),
        loss_ratio_by_fracture=loss_ratio_by_fracture(long, patients),
        wilcoxon=wilcoxon_table(long, patients),
        mannwhitney=mannwhitney_table(long, patients),
        bootstrap=bootstrap_table(long, patients, n_boot=n_boot, seed=seed),
        group_sizes=sizes,
        notes=notes,
        filters=filters,
        sides=side_table(long, patients),
    )


def _tables(report: CohortReport) -> dict[str, pd.DataFrame]:
    return {
        "table1_composition": report.table1,
        "table2_total_loss": report.table2,
        "table2_across_muscles": report.table2_across_muscles,
        "table3_per_muscle": report.table3,
        "figure8_loss_ratio": report.loss_ratio_by_fracture,
        "stats_wilcoxon": report.wilcoxon,
        "stats_mannwhitney": report.mannwhitney,
        "stats_bootstrap": report.bootstrap,
        "operated_vs_contralateral": report.sides,
        "patients": report.patients,
        "patient_muscles": report.long,
        "excluded": report.excluded,
    }


# ---------------------------------------------------------------- figures


def _figures(report: CohortReport) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = report.long
    names = [display(m) for m in ANALYSED_MUSCLES]
    x = np.arange(len(ANALYSED_MUSCLES))
    out: dict[str, bytes] = {}

    def png(fig: Any) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return buf.getvalue()

    # Figure 6: box plots of per-muscle loss, one panel per fracture type, male left / female right.
    fig, axes = plt.subplots(2, 1, figsize=(14, 9), sharey=True)
    for ax, fracture, letter in zip(axes, FRACTURES, "AB", strict=True):
        for offset, sex, hatch in ((-0.2, "M", ""), (0.2, "F", "//")):
            data = [
                long.loc[
                    (long["muscle"] == m) & (long["fracture_type"] == fracture) & (long["sex"] == sex),
                    "loss_cm3",
                ].to_numpy()
                for m in ANALYSED_MUSCLES
            ]
            if not any(len(d) for d in data):
                continue
            bp = ax.boxplot(
                [d if len(d) else [np.nan] for d in data],
                positions=x + offset,
                widths=0.35,
                patch_artist=True,
                showfliers=True,
            )
            for box in bp["boxes"]:
                box.set(facecolor=FRACTURE_COLOURS[fracture], alpha=0.6 if sex == "M" else 0.3, hatch=hatch)
        ax.set_title(f"({letter}) {fracture}: loss per muscle (male left, female right)")
        ax.set_ylabel("loss, pre − post (cm³)")
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
        ax.axhline(0, color="grey", lw=0.5)
    out["figure6_boxplots.png"] = png(fig)

    # Figure 7: mean loss per muscle, four subgroups.
    fig, ax = plt.subplots(figsize=(14, 5))
    means = long.groupby(["group", "muscle"])["loss_cm3"].mean()
    order = ["Female FNF", "Male FNF", "Female ITF", "Male ITF"]
    for i, g in enumerate(order):
        if g not in means.index.get_level_values(0):
            continue
        vals = [means.get((g, m), np.nan) for m in ANALYSED_MUSCLES]
        ax.bar(
            x + (i - 1.5) * 0.2,
            vals,
            width=0.2,
            color=GROUP_COLOURS[g],
            label=f"({'ABCD'[i]}) {g} (n={report.group_sizes.get(g, 0)})",
        )
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mean loss (cm³)")
    ax.legend(fontsize=8)
    ax.set_title("Mean muscle volume loss by subgroup")
    out["figure7_bars.png"] = png(fig)

    # Figure 8: loss ratio, sexes merged, FNF vs ITF (with the total).
    t = report.loss_ratio_by_fracture
    fig, ax = plt.subplots(figsize=(14, 5))
    xx = np.arange(len(t.index))
    for i, fracture in enumerate(t.columns):
        n = int((report.patients["fracture_type"] == fracture).sum())
        ax.bar(
            xx + (i - 0.5) * 0.4,
            t[fracture].to_numpy(),
            width=0.4,
            color=FRACTURE_COLOURS[fracture],
            label=f"({'AB'[i]}) {fracture} (n={n})",
        )
    ax.set_xticks(xx, list(t.index), rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mean loss ratio (pre − post) / pre (%)")
    ax.legend(fontsize=8)
    ax.set_title("Loss ratio by fracture type, sexes merged")
    out["figure8_loss_ratio.png"] = png(fig)
    return out


# ---------------------------------------------------------------- writing


def _html_table(df: pd.DataFrame, digits: int = 1) -> str:
    return df.to_html(float_format=lambda v: f"{v:.{digits}f}", na_rep="–", border=0, classes="t")


def write_report(
    report: CohortReport, out_dir: Path, title: str = "Thigh-muscle cohort report"
) -> dict[str, Path]:
    """CSV per table, one Excel workbook, PNG figures and one self-contained HTML report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    tables = _tables(report)
    for name, df in tables.items():
        path = out_dir / f"{name}.csv"
        df.to_csv(path)
        written[name] = path
    xlsx = out_dir / "cohort.xlsx"
    with pd.ExcelWriter(xlsx, engine="openpyxl") as xw:
        for name, df in tables.items():
            frame = df
            if isinstance(
                df.columns, pd.MultiIndex
            ):  # openpyxl cannot write MultiIndex columns without index
                frame = df.copy()
                frame.columns = [" | ".join(map(str, c)) for c in df.columns]
            frame.to_excel(xw, sheet_name=name[:31])
    written["xlsx"] = xlsx
    figures = _figures(report) if not report.patients.empty else {}
    for name, data in figures.items():
        (out_dir / name).write_bytes(data)
        written[name] = out_dir / name
    html_path = out_dir / "report.html"
    html_path.write_text(_html(report, figures, title))
    written["html"] = html_path
    return written


def _html(report: CohortReport, figures: dict[str, bytes], title: str) -> str:
    def img(name: str, caption: str) -> str:
        if name not in figures:
            return ""
        data = base64.b64encode(figures[name]).decode()
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    sizes = ", ".join(f"{g}: {n}" for g, n in report.group_sizes.items())
    flt = "; ".join(f"{k} = {', '.join(v)}" for k, v in report.filters.items()) or "none"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table.t{border-collapse:collapse;"
        "font-size:12px}table.t td,table.t th{border:1px solid #ccc;padding:2px 5px;text-align:right}"
        "img{max-width:100%}.note{color:#a40}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Patients with a pre/post pair: {len(report.patients)} ({html.escape(sizes)}). "
        f"Filters: {html.escape(flt)}. Loss = pre − post (positive = volume lost); adjusted = loss / height² "
        "(cm³/m²); loss ratio = (pre − post) / pre.</p>",
    ]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in report.notes]
    if not report.patients.empty:
        parts += [
            "<h2>Table 1. Pre-operative composition (% of total muscle volume)</h2>",
            _html_table(report.table1),
            "<h2>Table 2. Total loss of the 21 analysed muscles per patient</h2>",
            _html_table(report.table2),
            "<h3>Table 2 (paper variant): spread of the 21 per-muscle mean losses</h3>",
            _html_table(report.table2_across_muscles),
            "<h2>Table 3. Per-muscle mean loss</h2>",
            _html_table(report.table3.T),
            "<h2>Figures</h2>",
            img("figure6_boxplots.png", "Figure 6. Per-muscle loss by fracture type (A FNF, B ITF) and sex"),
            img("figure7_bars.png", "Figure 7. Mean loss per muscle by subgroup"),
            img("figure8_loss_ratio.png", "Figure 8. Loss ratio by fracture type, sexes merged"),
            "<h2>Statistics</h2><p>Wilcoxon signed-rank, pre vs post (rank-biserial r; "
            "q = Benjamini–Hochberg over the 21 muscles). "
            f"Groups with n &lt; {SMALL_N} are flagged: their p-values cannot reach 0.05.</p>",
            _html_table(report.wilcoxon, 4),
            "<p>Mann–Whitney U, FNF vs ITF (rank-biserial r, positive = FNF lost more).</p>",
            _html_table(report.mannwhitney, 4),
            "<p>Bootstrap 95 % confidence intervals of the mean loss ratio (%).</p>",
            _html_table(report.bootstrap, 2),
            "<h2>Operated vs contralateral side</h2><p>Loss ratio (%) of each side, patients with a known "
            "fractured side; Wilcoxon signed-rank on the paired ratios "
            "(r &gt; 0: operated side lost more).</p>",
            _html_table(report.sides, 3),
        ]
    parts += [
        "<h2>Patients not in the tables</h2>",
        _html_table(report.excluded) if not report.excluded.empty else "<p>none</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def table2_numbers(report: CohortReport) -> str:
    """Table 2 as plain text (for benchmarks and the CLI)."""
    if report.table2.empty:
        return "(no pairs)"
    t = report.table2.copy()
    t.columns = [f"{a.split(' ')[0]} {b}" for a, b in t.columns]
    return t.to_string(float_format=lambda v: "–" if math.isnan(v) else f"{v:.1f}")
