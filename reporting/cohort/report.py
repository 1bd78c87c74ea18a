"""The cohort report: every table and statistic for a set of pairs, written as CSV, Excel, PNG and HTML.

Why: the paper's Figure 1 (participant flow), Tables 1–3 and Figures 6–8 (plus a baseline table and
the statistics it could not run) for every pre/post pair the node measured (``dicomnode report
cohort``). Data come from :mod:`.collect`, the flow from :mod:`.flow`, Table 0 from :mod:`.baseline`,
numbers from :mod:`.statistics`, images from :mod:`.figures`; this module assembles and writes them.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from math import comb
from pathlib import Path

import pandas as pd

from reporting.cohort.baseline import baseline_table
from reporting.cohort.collect import FRACTURES, GROUPS, collect
from reporting.cohort.figures import FIGURE_NAMES, FLOW_FIGURE, figures, flow_png
from reporting.cohort.flow import participant_flow
from reporting.cohort.ranktests import RANK_SUM, SIGNED_RANK, TestKind, method_line, smallest_p
from reporting.cohort.statistics import (
    COUNT_ROWS,
    MIN_CI_N,
    SMALL_N,
    bootstrap_table,
    figure8_short_bars,
    loss_ratio_by_fracture,
    mannwhitney_table,
    mannwhitney_within_sex_table,
    short_note,
    side_table,
    table1,
    table2,
    table2_across_muscles,
    table3,
    table3_short_cells,
    wilcoxon_table,
)
from seg.records import CohortEntry

# counts, grades and whole years: never x.0
INTEGER_COLUMNS = ("n", "n_FNF", "n_ITF", "koval_grade", "days_between", "age_years", "remaining")
P_COLUMNS = ("p", "min_p", "q_bh")  # the HTML prints these "<0.0001" below P_FLOOR; the CSVs keep every digit
P_FLOOR = 1e-4
ALPHA = 0.05  # the level the "cannot reach 0.05" notes are about


@dataclass
class CohortReport:
    """Every table of the report as a DataFrame plus the per-patient data they come from."""

    patients: pd.DataFrame  # one row per included patient (totals)
    long: pd.DataFrame  # one row per patient × analysed muscle
    excluded: pd.DataFrame  # patient_id, issuer_of_patient_id, reason
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
    flow: pd.DataFrame = field(default_factory=pd.DataFrame)  # participant flow (reporting.cohort.flow)
    baseline: pd.DataFrame = field(default_factory=pd.DataFrame)  # Table 0 (reporting.cohort.baseline)
    mannwhitney_sex: pd.DataFrame = field(default_factory=pd.DataFrame)  # FNF vs ITF within each sex


def build_cohort(
    entries: list[CohortEntry], filters: dict[str, list[str]] | None = None, n_boot: int = 2000, seed: int = 0
) -> CohortReport:
    """All tables and statistics for the pairs in ``entries`` (optionally filtered)."""
    filters = filters or {}
    long, patients, excluded = collect(entries, filters)
    flow = participant_flow(entries, filters)
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
            flow=flow,
        )
    sizes = {g: int((patients["group"] == g).sum()) for g in GROUPS}
    for g, n in sizes.items():
        if 0 < n < SMALL_N:
            notes.append(f"{g}: n = {n} — small group, statistics are descriptive only")
    shares = {f: patients.loc[patients["fracture_type"] == f, "sex"].eq("F").mean() for f in FRACTURES}
    if all(pd.notna(v) for v in shares.values()) and abs(shares["FNF"] - shares["ITF"]) >= 0.25:
        mix = ", ".join(f"{f} {shares[f]:.0%} women" for f in FRACTURES)
        notes.append(f"FNF vs ITF pools both sexes ({mix}): a difference between the fracture types "
                     "may be one between the sexes; see the within-sex comparison "
                     "(stats_mannwhitney_within_sex)")
    flagged = patients["comparability"].fillna("")
    for code in sorted({c for text in flagged for c in text.split(",") if c}):
        n = int(flagged.str.contains(code, regex=False).sum())
        notes.append(f"{n} patient(s) with '{code}' (see patients.csv, column comparability): their "
                     "pairs are in the tables; check them before drawing conclusions")
    no_age = int(patients["age_years"].isna().sum())
    if no_age:
        notes.append(f"{no_age} patient(s) without a recorded age at the baseline CT: not in Table 0's age")
    no_height = int(patients["height_m"].isna().sum())
    if no_height:
        notes.append(
            f"{no_height} patient(s) without a plausible height: left out of the adjusted (cm³/m²) figures"
        )
    notes += table3_short_cells(long, patients)
    notes += [short_note("Figure 8", c) for c in figure8_short_bars(long, patients)]
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
        flow=flow,
        baseline=baseline_table(patients),
        mannwhitney_sex=mannwhitney_within_sex_table(long, patients),
    )


def _tables(report: CohortReport) -> dict[str, pd.DataFrame]:
    return {
        "flow": report.flow,
        "table0_baseline": report.baseline,
        "table1_composition": report.table1,
        "table2_total_loss": report.table2,
        "table2_across_muscles": report.table2_across_muscles,
        "table3_per_muscle": report.table3,
        "figure8_loss_ratio": report.loss_ratio_by_fracture,
        "stats_wilcoxon": report.wilcoxon,
        "stats_mannwhitney": report.mannwhitney,
        "stats_mannwhitney_within_sex": report.mannwhitney_sex,
        "stats_bootstrap": report.bootstrap,
        "operated_vs_contralateral": report.sides,
        "patients": report.patients,
        "patient_muscles": report.long,
        "excluded": report.excluded,
    }


def _tidy(df: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """``df`` as written to CSV/Excel, and whether its index is worth a column.

    Why: a RangeIndex is a row number nobody asked for; counts and grades read as ``2`` not ``2.0``
    (nullable Int64 where a value can be missing, e.g. the Koval grade); the count rows of Tables 1
    and 2 (:data:`COUNT_ROWS`) and of Table 3 as the page shows it (transposed) likewise.
    """
    out = df.copy()
    for col in INTEGER_COLUMNS:
        if col in out.columns:
            out[col] = out[col].astype("Int64")
    rows = [r for r in COUNT_ROWS if r in out.index and r not in out.columns]
    if rows:
        out = out.astype(object)
        for r in rows:
            out.loc[r] = [pd.NA if pd.isna(v) else int(v) for v in df.loc[r]]
    return out, not isinstance(df.index, pd.RangeIndex)


def _p_format(v: float) -> str:
    """A p or q for the HTML: 4 decimals, and "<0.0001" rather than a p of "0.0000"."""
    return f"<{P_FLOOR:.4f}" if v < P_FLOOR else f"{v:.4f}"


def _html_table(df: pd.DataFrame, digits: int = 1) -> str:
    """``df`` as the page shows it: counts as the CSVs write them (Table 2's n reads 2, not 2.0), p and
    q as :func:`_p_format`, every missing value "–"."""
    p_cols = {c: _p_format for c in P_COLUMNS if c in df.columns}
    df, _ = _tidy(df)
    # na_rep reaches neither pandas' NA in nullable integer columns (<NA>) nor a None (printed "None")
    df = df.apply(lambda c: c.astype(object).where(c.notna(), "–") if c.dtype.name == "Int64" else c)
    return df.to_html(
        float_format=lambda v: f"{v:.{digits}f}",
        formatters=p_cols or None,
        na_rep="–",
        border=0,
        classes="t",
        index=not isinstance(df.index, pd.RangeIndex),
    )


def _method_note(table: pd.DataFrame, kind: TestKind) -> str:
    """The footnote line under a test table: the test, and whether its p-values are exact or a
    normal approximation, as :mod:`.ranktests` computed them (the table's ``p_method``)."""
    if table.empty:
        return ""
    text = method_line(kind, list(table["p_method"].dropna()))
    return f"<p class='foot'>{html.escape(text)}</p>"


def _unreachable(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a test table whose p cannot reach 0.05: ``min_p`` (:func:`.ranktests.smallest_p`,
    conditional on the ties where the p is exact) is 0.05 or more."""
    return table[table["min_p"] >= ALPHA]


def _row_names(rows: pd.DataFrame) -> str:
    """Each row as a reader finds it in its table (sex, muscle, patients or measure), with its min_p."""
    keys = [c for c in ("sex", "muscle", "patients", "measure") if c in rows.columns]
    return "; ".join(", ".join(str(r[k]) for k in keys) + f" (min_p {r['min_p']:.3g})"
                     for _, r in rows.iterrows())


def _signed_rank_note(table: pd.DataFrame) -> str:
    """The paired tests' warning, only where a row cannot reach 0.05: the smallest exact two-sided
    signed-rank p is 2/2ⁿ with n the non-zero differences (ties do not raise it, zero differences
    do), so below :data:`SMALL_N` pairs and wherever zeros leave fewer than 6 non-zero ones."""
    if table.empty:
        return ""
    rows = _unreachable(table)
    if rows.empty:
        return ""
    small, zeros = rows[rows["small_group"]], rows[~rows["small_group"]]
    which = [f"those flagged small_group (n &lt; {SMALL_N} pairs)"] if not small.empty else []
    if not zeros.empty:
        which.append(f"those where zero differences leave fewer than {SMALL_N} non-zero ones: "
                     + html.escape(_row_names(zeros)))
    return (
        "<p class='note'>The smallest exact two-sided signed-rank p is 2/2ⁿ, n the non-zero "
        f"differences (column min_p), so these rows' p-values cannot reach 0.05: {' and '.join(which)}.</p>"
    )


def _mannwhitney_note(table: pd.DataFrame) -> str:
    """Which FNF vs ITF rows cannot reach p < 0.05: by group size where even without ties the
    smallest exact two-sided p, 2/C(n1+n2, n1), is 0.05 or more; by name where tied values raise
    a smaller one to 0.05 or more (``min_p``); nothing when every row can."""
    if table.empty:
        return ""
    rows = _unreachable(table)
    by_size = rows[pd.Series([smallest_p(comb(int(a + b), int(a))) >= ALPHA
                              for a, b in zip(rows["n_FNF"], rows["n_ITF"], strict=True)],
                             index=rows.index, dtype=bool)]
    sizes = sorted({(int(a), int(b)) for a, b in zip(by_size["n_FNF"], by_size["n_ITF"], strict=True)})
    tied = rows.drop(by_size.index)
    parts = []
    if sizes:
        lines = [f"n_FNF = {a} and n_ITF = {b} (2/C({a + b}, {a}) = {smallest_p(comb(a + b, a)):.3g})"
                 for a, b in sizes]
        parts.append(f"rows with {'; '.join(lines)} have p-values that cannot reach 0.05")
    if not tied.empty:
        parts.append("tied values raise it to 0.05 or more, so these p-values cannot reach 0.05 "
                     f"either: {_row_names(tied)}")
    if not parts:
        return ""
    return (
        "<p class='note'>The smallest exact two-sided Mann–Whitney p is 2/C(n_FNF + n_ITF, n_FNF) "
        f"without tied values, more with them (column min_p), so {html.escape('; '.join(parts))}.</p>"
    )


def _remove_stale(out_dir: Path, written: dict[str, Path], tables: list[str]) -> None:
    """Delete this report's own files from an earlier run that this run did not write (e.g. figures
    when no pairs are left), so the folder never mixes two reports; other files are not touched."""
    ours = {f"{name}.csv" for name in tables} | {*FIGURE_NAMES, FLOW_FIGURE, "cohort.xlsx", "report.html"}
    for name in sorted(ours - {p.name for p in written.values()}):
        (out_dir / name).unlink(missing_ok=True)


def write_report(
    report: CohortReport, out_dir: Path, title: str = "Thigh-muscle cohort report"
) -> dict[str, Path]:
    """CSV per table, one Excel workbook, PNG figures and one self-contained HTML report.

    The report owns its file names in ``out_dir``: those an earlier run wrote and this one does not
    (figures of a report that now has no pairs) are removed; nothing else in the folder is touched.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    tables = _tables(report)
    tidy = {name: _tidy(df) for name, df in tables.items()}
    for name, (df, index) in tidy.items():
        path = out_dir / f"{name}.csv"
        df.to_csv(path, index=index)
        written[name] = path
    xlsx = out_dir / "cohort.xlsx"
    with pd.ExcelWriter(xlsx, engine="openpyxl") as xw:
        for name, (df, index) in tidy.items():
            frame = df
            if isinstance(
                df.columns, pd.MultiIndex
            ):  # openpyxl cannot write MultiIndex columns without index
                frame = df.copy()
                frame.columns = [" | ".join(map(str, c)) for c in df.columns]
            frame.to_excel(xw, sheet_name=name[:31], index=index)
    written["xlsx"] = xlsx
    images = {FLOW_FIGURE: flow_png(report.flow)} if not report.flow.empty else {}
    images |= figures(report) if not report.patients.empty else {}
    for name, data in images.items():
        (out_dir / name).write_bytes(data)
        written[name] = out_dir / name
    html_path = out_dir / "report.html"
    html_path.write_text(_html(report, images, title))
    written["html"] = html_path
    _remove_stale(out_dir, written, list(tables))
    return written


def _html(report: CohortReport, images: dict[str, bytes], title: str) -> str:
    def img(name: str, caption: str) -> str:
        if name not in images:
            return ""
        data = base64.b64encode(images[name]).decode()
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
        "img{max-width:100%}.note{color:#a40}.foot{font-size:12px;margin-top:2px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Patients with a pre/post pair: {len(report.patients)} ({html.escape(sizes)}). "
        f"Filters: {html.escape(flt)}. Loss = pre − post (positive = volume lost); adjusted = loss / height² "
        "(cm³/m²); loss ratio = (pre − post) / pre.</p>",
    ]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in report.notes]
    if not report.flow.empty:
        parts += [
            "<h2>Figure 1. Participant flow</h2><p>Every patient the node has measured, each step that "
            "left patients out with its reasons, and the groups of the tables (flow.csv).</p>",
            img(FLOW_FIGURE, "Figure 1. Participant flow: from every measured patient to the groups"),
            _html_table(report.flow),
        ]
    if not report.patients.empty:
        parts += [
            "<h2>Table 0. Baseline characteristics</h2><p>Median [interquartile range] per group (age "
            "also mean ± SD); age at the baseline CT from PatientAge, else PatientBirthDate and "
            "StudyDate; pre-operative volume of the 21 analysed muscles, both legs.</p>",
            _html_table(report.baseline),
            "<h2>Table 1. Pre-operative composition (% of total muscle volume)</h2>"
            "<p>n: the patients of each group.</p>",
            _html_table(report.table1),
            "<h2>Table 2. Total loss of the 21 analysed muscles per patient</h2>"
            "<p>n: the patients each column rests on (an adjusted figure needs a height).</p>",
            _html_table(report.table2),
            "<h3>Table 2 (paper variant): spread of the 21 per-muscle mean losses</h3>"
            "<p>Statistics over the 21 muscles' group means: n muscles counts muscles, not patients; "
            "n patients, the patients behind each mean.</p>",
            _html_table(report.table2_across_muscles),
            "<h2>Table 3. Per-muscle mean loss</h2><p>n: the patients each column rests on (an adjusted "
            "column needs a height).</p>",
            _html_table(report.table3.T),
            "<h2>Figures</h2>",
            img("figure6_boxplots.png", "Figure 6. Per-muscle loss by fracture type (A FNF, B ITF) and sex"),
            img("figure7_bars.png", "Figure 7. Mean loss per muscle by subgroup"),
            img("figure8_loss_ratio.png", "Figure 8. Loss ratio by fracture type, sexes merged"),
            "<h2>Statistics</h2><p>Wilcoxon signed-rank, pre vs post (rank-biserial r; "
            "q = Benjamini–Hochberg over the 21 muscles). "
            f"Groups with n &lt; {SMALL_N} are flagged small_group.</p>",
            _signed_rank_note(report.wilcoxon),
            _html_table(report.wilcoxon, 4),
            _method_note(report.wilcoxon, SIGNED_RANK),
            "<p>Mann–Whitney U, FNF vs ITF (rank-biserial r, positive = FNF lost more).</p>",
            _mannwhitney_note(report.mannwhitney),
            _html_table(report.mannwhitney, 4),
            _method_note(report.mannwhitney, RANK_SUM),
            "<p>Mann–Whitney U, FNF vs ITF within each sex (the paper compares the fracture types within "
            "women and within men; r positive = FNF lost more; q = Benjamini–Hochberg over the 21 muscles "
            f"of each sex and measure). Rows with a group below n = {SMALL_N} are flagged small_group.</p>",
            _mannwhitney_note(report.mannwhitney_sex),
            _html_table(report.mannwhitney_sex, 4),
            _method_note(report.mannwhitney_sex, RANK_SUM),
            "<p>Bootstrap 95 % confidence intervals (percentile) of the mean loss ratio (%). "
            f"No interval (–) where a group has n &lt; {MIN_CI_N} (flagged small_group): "
            "with so few values the bootstrap percentiles are about the range of the data, not a CI.</p>",
            _html_table(report.bootstrap, 2),
            "<h2>Operated vs contralateral side</h2><p>Loss ratio (%) of each side, patients with a known "
            "fractured side; Wilcoxon signed-rank on the paired ratios "
            "(r &gt; 0: operated side lost more; q = Benjamini–Hochberg over the 21 muscles).</p>",
            _signed_rank_note(report.sides),
            _html_table(report.sides, 3),
            _method_note(report.sides, SIGNED_RANK),
        ]
    parts += [
        "<h2>Patients not in the tables</h2>",
        _html_table(report.excluded) if not report.excluded.empty else "<p>none</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def table2_numbers(report: CohortReport) -> str:
    """Table 2 as plain text for the CLI and the benchmarks, within 80 columns: one row per group
    (the paper's statistics across), raw loss first, then height²-adjusted; "–" where a group has
    too few pairs for a figure."""
    if report.table2.empty:
        return "(no pairs)"
    t = report.table2
    stats = [r for r in t.index if r != "n"]
    lines = ["Table 2: loss of the 21 analysed muscles, baseline to follow-up",
             f"{'':<18}{'n':>4}" + "".join(f"{r:>8}" for r in stats)]
    for kind in dict.fromkeys(k for k, _ in t.columns):
        lines.append(kind)
        for group in dict.fromkeys(g for k, g in t.columns if k == kind):
            col = t[(kind, group)]
            n = 0 if math.isnan(col["n"]) else int(col["n"])
            lines.append(f"  {group:<16}{n:>4}" + "".join(
                f"{'–' if math.isnan(col[r]) else format(col[r], '.1f'):>8}" for r in stats))
    return "\n".join(lines)
