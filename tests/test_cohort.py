"""Cohort report: tables recomputed independently from per-patient numbers, figures, Excel, HTML, filters."""

from __future__ import annotations

import csv
import math
import re
from html.parser import HTMLParser
from math import comb
from pathlib import Path

import numpy as np
import pytest
from browser import launched, requires_chromium
from openpyxl import load_workbook
from scipy.stats import mannwhitneyu, wilcoxon

from reporting.change import compute_change
from reporting.cohort.collect import GROUPS, parse_filters
from reporting.cohort.figures import FIGURE_NAMES, FLOW_FIGURE, figure6
from reporting.cohort.ranktests import smallest_p
from reporting.cohort.report import build_cohort, write_report
from reporting.cohort.statistics import MIN_CI_N
from seg.labels import ANALYSED_MUSCLES, LABEL_OF, by_name, structures
from seg.records import CohortEntry, Reason, ReasonCode, StructureVolume, StudyRef, VolumeRecord

COMPOSITION = [("FNF", "F", 2), ("FNF", "M", 4), ("ITF", "F", 10), ("ITF", "M", 2)]


def _record(series: str, volumes: dict[int, tuple[float, float]]) -> VolumeRecord:
    return VolumeRecord(
        series_instance_uid=series,
        structures=tuple(
            StructureVolume(
                label=s.label,
                name=s.name,
                group=s.group,
                volume_cm3=sum(volumes[s.label]),
                left_cm3=volumes[s.label][0],
                right_cm3=volumes[s.label][1],
            )
            for s in structures()[1:]
        ),
    )


def _ref(study: str, date: str) -> StudyRef:
    return StudyRef(study_instance_uid=study, series_instance_uid=f"{study}.1", study_date=date)


def _cohort(seed: int = 7, composition=COMPOSITION) -> tuple[list[CohortEntry], dict[str, dict]]:
    """Entries as pairing.cohort_entries returns them, plus the truth per patient."""
    rng = np.random.default_rng(seed)
    entries, truth = [], {}
    n = 0
    for fracture, sex, count in composition:
        for _ in range(count):
            n += 1
            pid = f"C{n:02d}"
            height = float(rng.normal(1.6, 0.06))
            pre = {
                s.label: (float(rng.uniform(20, 400)), float(rng.uniform(20, 400))) for s in structures()[1:]
            }
            keep = {s.label: float(rng.uniform(0.5, 1.0)) if s.analysed else 1.0 for s in structures()[1:]}
            post = {lab: (v[0] * keep[lab], v[1]) for lab, v in pre.items()}  # left side operated
            change = compute_change(
                _record(f"{pid}.1.1", pre),
                _record(f"{pid}.2.1", post),
                height,
                _ref(f"{pid}.1", "20230101"),
                _ref(f"{pid}.2", "20230501"),
                patient_id=pid,
                fractured_side="left",
                height_source="registry",
            ).with_facts(sex=sex, fracture_type=fracture, koval_grade=n % 7 + 1 if n % 3 else None)
            entries.append(CohortEntry(patient_id=pid, change=change))
            truth[pid] = {
                "sex": sex,
                "fracture": fracture,
                "height": height,
                "pre": pre,
                "post": post,
                "group": f"{'Female' if sex == 'F' else 'Male'} {fracture}",
            }
    return entries, truth


@pytest.fixture(scope="module")
def cohort():
    entries, truth = _cohort()
    return build_cohort(entries, n_boot=300), truth, entries


def _total(v: dict[int, tuple[float, float]], names=ANALYSED_MUSCLES) -> float:
    return sum(sum(v[LABEL_OF[m]]) for m in names)


def test_group_sizes_and_small_groups(cohort) -> None:
    report, _, _ = cohort
    assert report.group_sizes == {"Female FNF": 2, "Female ITF": 10, "Male FNF": 4, "Male ITF": 2}
    assert len(report.patients) == 18 and report.excluded.empty
    small = " ".join(report.notes)
    assert "Female FNF: n = 2" in small and "Male ITF: n = 2" in small and "Female ITF" not in small


def test_tables_match_independent_recomputation(cohort) -> None:
    report, truth, _ = cohort
    for g in GROUPS:
        pids = [p for p, t in truth.items() if t["group"] == g]
        loss = np.array([_total(truth[p]["pre"]) - _total(truth[p]["post"]) for p in pids])
        adj = np.array([lo / truth[p]["height"] ** 2 for lo, p in zip(loss, pids, strict=True)])
        t2 = report.table2
        assert t2.loc["n", ("Raw (cm³)", g)] == len(pids)
        assert t2.loc["Mean", ("Raw (cm³)", g)] == pytest.approx(loss.mean())
        assert t2.loc["Std", ("Raw (cm³)", g)] == pytest.approx(loss.std(ddof=1))
        assert t2.loc["50%", ("Raw (cm³)", g)] == pytest.approx(np.median(loss))
        assert t2.loc["Max", ("Adjusted (cm³/m²)", g)] == pytest.approx(adj.max())
        assert t2.loc["Min", ("Adjusted (cm³/m²)", g)] == pytest.approx(adj.min())
        # Table 1: mean share of the pre-operative volume of all muscle (labels 1-27).
        muscles = [s.name for s in structures()[1:] if s.is_muscle]
        share = np.mean(
            [
                sum(truth[p]["pre"][LABEL_OF["gluteus_maximus"]]) / _total(truth[p]["pre"], muscles) * 100
                for p in pids
            ]
        )
        assert report.table1.loc["Gluteus maximus", g] == pytest.approx(share)
        # Table 3: mean per-muscle loss, adjusted loss and loss ratio.
        lab = LABEL_OF["vastus_lateralis"]
        raw = [sum(truth[p]["pre"][lab]) - sum(truth[p]["post"][lab]) for p in pids]
        ratio = [r / sum(truth[p]["pre"][lab]) * 100 for r, p in zip(raw, pids, strict=True)]
        adj_m = [r / truth[p]["height"] ** 2 for r, p in zip(raw, pids, strict=True)]
        assert report.table3.loc[("Raw loss (cm³)", g), "Vastus lateralis"] == pytest.approx(np.mean(raw))
        assert report.table3.loc[("Adjusted loss (cm³/m²)", g), "Vastus lateralis"] == pytest.approx(
            np.mean(adj_m)
        )
        assert report.table3.loc[("Loss ratio (%)", g), "Vastus lateralis"] == pytest.approx(np.mean(ratio))
    # Table 1's sum over the 21 analysed muscles is below 100 % (the "else" muscles make up the rest).
    assert (report.table1.loc["Sum"] < 100).all() and (report.table1.loc["Sum"] > 50).all()


def test_statistics_match_scipy(cohort) -> None:
    report, truth, _ = cohort
    lab = LABEL_OF["gluteus_maximus"]
    fnf = [p for p, t in truth.items() if t["fracture"] == "FNF"]
    itf = [p for p, t in truth.items() if t["fracture"] == "ITF"]
    pre = [sum(truth[p]["pre"][lab]) for p in fnf]
    post = [sum(truth[p]["post"][lab]) for p in fnf]
    w = report.wilcoxon.set_index(["muscle", "patients"]).loc[("Gluteus maximus", "FNF")]
    assert w["n"] == 6 and w["p"] == pytest.approx(wilcoxon(pre, post).pvalue)
    assert w["rank_biserial_r"] == pytest.approx(1.0)  # every patient lost volume
    assert bool(w["small_group"]) is False
    ratio = {
        p: (sum(truth[p]["pre"][lab]) - sum(truth[p]["post"][lab])) / sum(truth[p]["pre"][lab]) * 100
        for p in truth
    }
    mw = mannwhitneyu([ratio[p] for p in fnf], [ratio[p] for p in itf], alternative="two-sided")
    m = report.mannwhitney.set_index(["muscle", "measure"]).loc[("Gluteus maximus", "loss_pct")]
    assert m["p"] == pytest.approx(mw.pvalue)
    assert m["rank_biserial_r"] == pytest.approx(2 * mw.statistic / (6 * 12) - 1)
    b = report.bootstrap.set_index(["muscle", "subset"]).loc[("Gluteus maximus", "ITF")]
    assert b["ci95_low"] <= np.mean([ratio[p] for p in itf]) <= b["ci95_high"]
    assert bool(
        report.bootstrap.set_index(["muscle", "subset"]).loc[("Gluteus maximus", "Male ITF"), "small_group"]
    )
    assert report.wilcoxon["q_bh"].dropna().between(0, 1).all()


def test_outputs_written(cohort, tmp_path) -> None:
    report, _, _ = cohort
    written = write_report(report, tmp_path / "out")
    for name in ("figure6_boxplots.png", "figure7_bars.png", "figure8_loss_ratio.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert (tmp_path / "out" / FLOW_FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = written["html"].read_text()
    assert html.count("data:image/png;base64,") == 4  # Figure 1 and Figures 6-8
    assert "Table 1" in html and "Table 2" in html and "Table 3" in html and "Mann–Whitney" in html
    assert "Figure 1. Participant flow" in html and "Table 0. Baseline characteristics" in html
    wb = load_workbook(written["xlsx"], read_only=True)
    assert {"flow", "table0_baseline", "table1_composition", "table2_total_loss", "table3_per_muscle",
            "stats_wilcoxon", "stats_mannwhitney_within_sex"} <= set(wb.sheetnames)
    assert (tmp_path / "out" / "table2_total_loss.csv").read_text().count("\n") >= 8


def test_filters_and_exclusions() -> None:
    entries, _ = _cohort()
    entries[0] = entries[0].model_copy(update={"change": entries[0].change.with_facts(fracture_type=None)})
    entries.append(CohortEntry(patient_id="LONELY", reasons=(
        Reason(ReasonCode.SINGLE_STUDY, "single study for this patient"),)))
    report = build_cohort(entries, n_boot=50)
    reasons = dict(zip(report.excluded["patient_id"], report.excluded["reason"], strict=True))
    assert "not FNF/ITF" in reasons["C01"] and reasons["LONELY"].startswith("single study")
    assert report.group_sizes["Female FNF"] == 1
    only_fnf = build_cohort(entries, parse_filters(["fracture_type=FNF"]), n_boot=50)
    assert len(only_fnf.patients) == 5 and set(only_fnf.patients["fracture_type"]) == {"FNF"}
    males = build_cohort(entries, parse_filters(["sex=M", "fracture_type=FNF,ITF"]), n_boot=50)
    assert len(males.patients) == 6
    with pytest.raises(ValueError):
        parse_filters(["fracture_type"])
    empty = build_cohort([], n_boot=10)
    assert empty.patients.empty and empty.notes


def test_operated_vs_contralateral(cohort) -> None:
    report, truth, _ = cohort
    lab = LABEL_OF["gluteus_maximus"]
    op = [(truth[p]["pre"][lab][0] - truth[p]["post"][lab][0]) / truth[p]["pre"][lab][0] * 100 for p in truth]
    row = report.sides.set_index("muscle").loc["Gluteus maximus"]
    assert row["n"] == 18 and row["contralateral_loss_pct"] == pytest.approx(0.0)
    assert row["operated_loss_pct"] == pytest.approx(np.mean(op))
    assert row["p"] == pytest.approx(wilcoxon(op, [0.0] * 18).pvalue) and row["rank_biserial_r"] == 1.0
    left = [LABEL_OF[m] for m in ANALYSED_MUSCLES]
    total = np.mean(
        [
            (sum(truth[p]["pre"][lb][0] for lb in left) - sum(truth[p]["post"][lb][0] for lb in left))
            / sum(truth[p]["pre"][lb][0] for lb in left)
            * 100
            for p in truth
        ]
    )
    assert report.sides.set_index("muscle").loc["Total (21 muscles)", "operated_loss_pct"] == pytest.approx(
        total
    )


def test_operated_vs_contralateral_has_q_values_over_the_21_muscles() -> None:
    """The side comparison is 21 tests like the others: its q is Benjamini–Hochberg over the muscles
    (scipy's), the total's row has none, and no q is below its p."""
    from scipy.stats import false_discovery_control

    rng = np.random.default_rng(3)
    entries = []
    for n in range(12):  # the contralateral side changes too, by a different amount per muscle
        pre = {s.label: (float(rng.uniform(50, 400)), float(rng.uniform(50, 400))) for s in structures()[1:]}
        post = {lab: (v[0] * rng.uniform(0.6, 1.0), v[1] * rng.uniform(0.85, 1.1)) for lab, v in pre.items()}
        change = compute_change(_record(f"S{n}.1.1", pre), _record(f"S{n}.2.1", post), 1.6,
                                _ref(f"S{n}.1", "20230101"), _ref(f"S{n}.2", "20230501"),
                                patient_id=f"S{n}", fractured_side="left", height_source="registry"
                                ).with_facts(sex="F", fracture_type="ITF")
        entries.append(CohortEntry(patient_id=f"S{n}", change=change))
    sides = build_cohort(entries, n_boot=20).sides.set_index("muscle")
    muscles = sides.drop(index="Total (21 muscles)")
    assert len(muscles) == 21 and muscles["p"].nunique() > 5
    assert muscles["q_bh"].to_numpy() == pytest.approx(false_discovery_control(muscles["p"].to_numpy()))
    assert (muscles["q_bh"] >= muscles["p"]).all()
    assert math.isnan(sides.loc["Total (21 muscles)", "q_bh"])


def test_table2_text_reads_at_80_columns(cohort) -> None:
    """`dicomnode report cohort` prints Table 2 one group a row, within 80 columns: whole pair counts,
    and each group's mean raw loss as the per-patient totals give it."""
    from reporting.cohort.report import table2_numbers

    report, truth, _ = cohort
    text = table2_numbers(report)
    assert max(len(line) for line in text.splitlines()) <= 80 and "NaN" not in text
    rows = [line.split() for line in text.splitlines() if line.split()[0] in ("Female", "Male")]
    assert len(rows) == 2 * len(GROUPS)
    raw = {f"{r[0]} {r[1]}": r[2:] for r in rows[: len(GROUPS)]}
    for group in GROUPS:
        losses = [_total(t["pre"]) - _total(t["post"]) for t in truth.values() if t["group"] == group]
        assert int(raw[group][0]) == len(losses)
        assert float(raw[group][1]) == pytest.approx(np.mean(losses), abs=0.051)


@requires_chromium
def test_report_page_in_chromium_shows_every_table_and_figure(cohort, tmp_path) -> None:
    """report.html as a reader opens it: every figure decodes, every table is there with numbers, the
    page raises no error, and its text is the cohort's (a real browser, not a string search)."""
    report, _, _ = cohort
    page_path = write_report(report, tmp_path / "out")["html"]
    with launched() as chromium:
        page = chromium.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.goto(page_path.as_uri())
        heads = page.locator("h2").all_inner_texts()
        first = ["Figure 1", "Table 0", "Table 1", "Table 2", "Table 3"]
        assert [h.split(".")[0] for h in heads[:5]] == first
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
        assert len(sizes) == 4 and all(done and width > 300 for done, width in sizes), sizes
        assert page.locator("table").count() >= 3
        body = page.inner_text("body")
        assert f"Patients with a pre/post pair: {len(report.patients)}" in body
        assert "<NA>" not in body  # the flow's empty "remaining" cells read "–"
        assert not errors, errors


# ---------------------------------------------------------------- audit: tidy, honest outputs


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts (the header row first), entities decoded."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _html_columns(page: str, column: str) -> list[str]:
    """Every cell under a header named ``column``, across all the page's tables."""
    parser = _Tables()
    parser.feed(page)
    cells = []
    for table in parser.tables:
        head = table[0]
        if column in head:
            cells += [row[head.index(column)] for row in table[1:] if len(row) == len(head)]
    return cells


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def _section(page: str, heading: str) -> str:
    """The page from the paragraph starting ``heading`` to the next table: what a reader sees above it."""
    start = page.index(heading)
    return page[start : page.index("<table", start)]


def _unreachable_claims(page: str) -> list[str]:
    """The page's paragraphs that say some p-values cannot reach 0.05."""
    return [p for p in re.findall(r"<p[^>]*>(.*?)</p>", page, re.S) if "cannot reach 0.05" in p]


@pytest.fixture(scope="module")
def written(cohort, tmp_path_factory) -> dict[str, Path]:
    """The fixture cohort's report written once, for the tests that only read its files."""
    report, _, _ = cohort
    return write_report(report, tmp_path_factory.mktemp("cohort") / "out")


def test_bootstrap_has_no_interval_for_tiny_groups(cohort, written) -> None:
    """With n = 2 a percentile bootstrap is just min..max of the two values: no CI is reported below
    MIN_CI_N (empty in the CSV), and such rows stay flagged as small."""
    report, _, _ = cohort
    b = report.bootstrap
    tiny = b["n"] < MIN_CI_N
    assert tiny.any() and (~tiny).any()
    assert b.loc[tiny, ["ci95_low", "ci95_high"]].isna().all().all()
    assert b.loc[tiny, "small_group"].all()
    assert b.loc[~tiny, ["ci95_low", "ci95_high"]].notna().all().all()
    male_itf = b.set_index(["muscle", "subset"]).loc[("Gluteus maximus", "Male ITF")]
    assert male_itf["n"] == 2 and math.isnan(male_itf["ci95_low"]) and bool(male_itf["small_group"])
    rows = _csv_rows(written["stats_bootstrap"])
    head = rows[0]
    for row in rows[1:]:
        if int(row[head.index("n")]) < MIN_CI_N:
            assert row[head.index("ci95_low")] == row[head.index("ci95_high")] == ""


def test_html_prints_tiny_p_values_as_below_floor(cohort, written) -> None:
    """A p of 7.6e-6 is not "0.0000": the HTML says "<0.0001"; the CSV keeps the full value."""
    report, _, _ = cohort
    page = written["html"].read_text()
    cells = _html_columns(page, "p") + _html_columns(page, "q_bh")
    assert "<0.0001" in cells and "0.0000" not in cells
    rows = _csv_rows(written["stats_wilcoxon"])
    p_csv = min(float(r[rows[0].index("p")]) for r in rows[1:] if r[rows[0].index("p")])
    assert p_csv == pytest.approx(report.wilcoxon["p"].min(), rel=1e-12) and p_csv < 1e-4


def test_html_counts_are_integers_and_missing_cells_read_dash(written) -> None:
    """The page a researcher copies from: Table 2's n reads "2", not "2.0", and an empty cell (the
    flow's "remaining" of each group) reads "–", never "None", "<NA>" or "nan"."""
    parser = _Tables()
    parser.feed(written["html"].read_text())
    cells = [c for table in parser.tables for row in table for c in row]
    assert not {"None", "<NA>", "nan", "NaN"} & set(cells)
    n_rows = [row[1:] for table in parser.tables for row in table if row and row[0] == "n"]
    assert n_rows and all(v.isdigit() for row in n_rows for v in row), n_rows
    flow = next(t for t in parser.tables if t[0] == ["step", "box", "label", "n", "remaining"])
    groups = [r for r in flow[1:] if r[1] == "group"]
    assert groups and all(r[-1] == "–" for r in groups), groups


def test_small_sample_warnings_only_where_true(tmp_path) -> None:
    """The signed-rank warning (n < 6: p ≥ 0.0625) belongs to the paired tests only: 2 vs 10 patients
    can reach p < 0.05 in Mann–Whitney (2/66), 2 vs 3 cannot (2/10), and the page says so."""
    entries, _ = _cohort()
    assert smallest_p(comb(12, 2)) == pytest.approx(2 / 66)
    exact = mannwhitneyu([1.0, 2.0], np.arange(3.0, 13.0), method="exact").pvalue
    assert exact == pytest.approx(smallest_p(comb(12, 2))) and exact < 0.05
    women = build_cohort(entries, parse_filters(["sex=F"]), n_boot=50)  # FNF 2 vs ITF 10
    assert women.mannwhitney["small_group"].all()  # flagged small, yet p < 0.05 is attainable
    page = write_report(women, tmp_path / "women")["html"].read_text()
    assert "cannot reach 0.05" in _section(page, "Wilcoxon signed-rank, pre vs post")  # FNF: n = 2
    claims = _unreachable_claims(page)  # each states its bound, and here only the paired one applies
    assert claims and all("signed-rank p is 2/2ⁿ" in c for c in claims), claims
    assert "cannot reach" not in _section(page, "Mann–Whitney U")
    few = build_cohort(entries, parse_filters(["patient_id=C01,C02,C07,C08,C09"]), n_boot=50)  # 2 vs 3
    page = write_report(few, tmp_path / "few")["html"].read_text()
    note = _section(page, "Mann–Whitney U")
    assert "cannot reach 0.05" in note and "2/C(5, 2) = 0.2" in note and "2/2ⁿ" not in note


def test_no_signed_rank_warning_without_small_rows(written) -> None:
    """The fixture's paired tests all have n ≥ 6 (all 18, FNF 6, ITF 12): no signed-rank warning is true
    there. The only true claim is the within-sex Mann–Whitney's for the men (FNF 4 vs ITF 2: 2/15)."""
    page = written["html"].read_text()
    assert "cannot reach" not in _section(page, "Wilcoxon signed-rank, pre vs post")
    claims = _unreachable_claims(page)
    assert len(claims) == 1 and "n_FNF = 4 and n_ITF = 2 (2/C(6, 4) = 0.133)" in claims[0], claims


def _set_muscle(entries: list, pid: str, muscle: str, pre: float, post: float) -> None:
    """Patient ``pid``'s ``muscle`` measured ``pre`` and ``post`` cm³ (both legs together)."""
    i = next(i for i, e in enumerate(entries) if e.patient_id == pid)
    change = entries[i].change
    change = change.model_copy(update={"structures": tuple(
        s.model_copy(update={"pre_cm3": pre, "post_cm3": post}) if s.name == muscle else s
        for s in change.structures)})
    entries[i] = entries[i].model_copy(update={"change": change})


def test_a_zero_difference_that_leaves_5_pairs_is_warned_of(tmp_path) -> None:
    """FNF has 6 pairs, so no row is small_group; one FNF patient's gluteus maximus unchanged
    leaves 5 non-zero differences, whose smallest exact p is 2/2⁵ = 0.0625: the row's min_p says
    so and the page warns of it (the size-only rule said nothing)."""
    entries, _ = _cohort()
    _set_muscle(entries, "C01", "gluteus_maximus", 300.0, 300.0)  # FNF, woman
    report = build_cohort(entries, n_boot=20)
    w = report.wilcoxon.set_index(["muscle", "patients"])
    row = w.loc[("Gluteus maximus", "FNF")]
    assert row["n"] == 6 and not row["small_group"] and row["p_method"] == "exact"
    assert row["min_p"] == 2 / 2**5 and row["p"] == pytest.approx(2 / 2**5)  # all 5 lost volume
    assert (w.drop(("Gluteus maximus", "FNF"))["min_p"].dropna() < 0.05).all()
    written = write_report(report, tmp_path / "out")
    note = _section(written["html"].read_text(), "Wilcoxon signed-rank, pre vs post")
    assert "cannot reach 0.05" in note and "zero differences leave fewer than 6" in note
    assert "Gluteus maximus, FNF (min_p 0.0625)" in note and "small_group (n" not in note
    rows = _csv_rows(written["stats_wilcoxon"])
    head = rows[0]
    mins = {(r[0], r[1]): r[head.index("min_p")] for r in rows[1:]}
    assert float(mins[("Gluteus maximus", "FNF")]) == 0.0625


def test_tied_loss_ratios_that_put_005_out_of_reach_are_warned_of(tmp_path) -> None:
    """Women, FNF 2 against ITF 10: without ties the smallest exact p is 2/66 = 0.03 and no warning
    is due. Gluteus maximus loss ratios of 10 and 20 % (FNF) against 20, 30, 35 … 60, 60 and 70 %
    (ITF) share both extremes (4 of the 66 splits reach them), so its smallest p is 4/66 = 0.06
    (the raw loss's too; not the adjusted one's) and the within-sex note names those rows, while the
    men's size-only claim (4 vs 2) stays."""
    entries, _ = _cohort()
    ratios = {"C01": 10, "C02": 20, "C07": 20, "C08": 30, "C09": 35, "C10": 40, "C11": 45,
              "C12": 50, "C13": 55, "C14": 60, "C15": 60, "C16": 70}  # the women, FNF then ITF
    for pid, r in ratios.items():
        _set_muscle(entries, pid, "gluteus_maximus", 200.0, 200.0 - 2 * r)
    report = build_cohort(entries, n_boot=20)
    t = report.mannwhitney_sex.set_index(["sex", "muscle", "measure"])
    row = t.loc[("Female", "Gluteus maximus", "loss_pct")]
    assert (row["n_FNF"], row["n_ITF"]) == (2, 10) and row["p_method"] == "exact"
    assert row["min_p"] == pytest.approx(4 / 66) and row["p"] == pytest.approx(4 / 66)
    assert t.loc[("Female", "Gluteus maximus", "loss_cm3"), "min_p"] == pytest.approx(4 / 66)
    # divided by each woman's height², the losses no longer tie: 2/66 is reachable again
    assert t.loc[("Female", "Gluteus maximus", "loss_index_cm3_m2"), "min_p"] == pytest.approx(2 / 66)
    written = write_report(report, tmp_path / "out")
    claims = _unreachable_claims(_section(written["html"].read_text(), "FNF vs ITF within each sex"))
    assert len(claims) == 1 and "n_FNF = 4 and n_ITF = 2 (2/C(6, 4) = 0.133)" in claims[0]
    assert "tied values raise it" in claims[0]
    assert "Female, Gluteus maximus, loss_pct (min_p 0.0606)" in claims[0]
    assert "Female, Gluteus maximus, loss_cm3 (min_p 0.0606)" in claims[0]
    assert claims[0].count("Female") == 2  # only those rows of the women's
    rows = _csv_rows(written["stats_mannwhitney_within_sex"])
    assert rows[0][rows[0].index("p_method") + 1] == "min_p"


def test_rewrite_removes_own_stale_outputs_only(cohort, tmp_path) -> None:
    """A report with no pairs written over a full one leaves no old figure beside its new tables, and
    removes nothing that is not one of the report's own file names."""
    report, _, entries = cohort
    out = tmp_path / "out"
    first = write_report(report, out)
    assert set(FIGURE_NAMES) <= {p.name for p in first.values()}
    (out / "figure9_mine.png").write_bytes(b"keep")
    (out / "notes.txt").write_text("keep")
    empty = build_cohort(entries, parse_filters(["sex=X"]), n_boot=10)
    assert empty.patients.empty
    second = write_report(empty, out)
    assert not any((out / name).exists() for name in FIGURE_NAMES)
    names = {p.name for p in out.iterdir()}
    assert names == {p.name for p in second.values()} | {"figure9_mine.png", "notes.txt"}
    assert (out / "figure9_mine.png").read_bytes() == b"keep"
    # only the participant flow, drawn afresh: it shows why no pair is left
    assert second["html"].read_text().count("data:image/png") == 1 and FLOW_FIGURE in second


def test_csvs_have_named_columns_and_integer_counts(written) -> None:
    """No CSV starts with an unnamed row-number column; counts and Koval grades are integers, the
    grade empty where unknown (not "2.0" / "nan")."""
    for name, path in written.items():
        if path.suffix != ".csv":
            continue
        rows = _csv_rows(path)
        assert rows[0] and rows[0][0], name  # first header cell names its column
        for col in ("n", "n_FNF", "n_ITF", "koval_grade", "days_between"):
            if col in rows[0]:
                values = [r[rows[0].index(col)] for r in rows[1:]]
                assert all(v == "" or v.isdigit() for v in values), (name, col, values[:5])
    patients = _csv_rows(written["patients"])
    grades = [r[patients[0].index("koval_grade")] for r in patients[1:]]
    assert "" in grades and any(g.isdigit() for g in grades)
    for name, label in (("table1_composition", "n"), ("table2_total_loss", "n"),
                        ("table2_across_muscles", "n muscles"), ("table2_across_muscles", "n patients")):
        n_row = next(r for r in _csv_rows(written[name]) if r[0] == label)
        assert all(v.isdigit() for v in n_row[1:]), (name, n_row)


def test_docs_name_every_column_of_the_per_patient_files(written) -> None:
    """docs/cohort.md names each column a researcher loads from patients.csv and patient_muscles.csv."""
    doc = (Path(__file__).parents[1] / "docs" / "cohort.md").read_text()
    start = doc.index("**The per-patient files' columns**")
    named = set(re.findall(r"`([a-z_0-9]+)`", doc[start : doc.index("###", start)]))
    for name in ("patients", "patient_muscles"):
        columns = _csv_rows(written[name])[0]
        assert not [c for c in columns if c not in named], name


def test_figure6_panels_name_the_sexes(cohort) -> None:
    """Each Figure 6 panel says which boxes are men's and which women's (and how many), in a legend."""
    report, _, _ = cohort
    fig = figure6(report)
    try:
        for ax, fracture in zip(fig.axes, ("FNF", "ITF"), strict=True):
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            assert labels == [
                f"Male {fracture} (n={report.group_sizes[f'Male {fracture}']})",
                f"Female {fracture} (n={report.group_sizes[f'Female {fracture}']})",
            ]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_patients_csv_traces_each_pair_and_the_sex_mix_is_noted() -> None:
    """A researcher can find each pair's studies (dates, series UIDs) in patients.csv, and is told when
    the FNF vs ITF comparison pools groups whose sexes differ (the paper's: 33 % against 83 % women)."""
    report = build_cohort(_cohort()[0], n_boot=20)
    row = report.patients.iloc[0]
    assert row["baseline_study_date"] < row["followup_study_date"]
    assert row["baseline_series_uid"] and row["followup_series_uid"] != row["baseline_series_uid"]
    assert any(n.startswith("FNF vs ITF pools both sexes (FNF 33% women, ITF 83% women)")
               for n in report.notes), report.notes
    women = build_cohort(_cohort()[0], parse_filters(["sex=F"]), n_boot=20)
    assert not any("pools both sexes" in n for n in women.notes)


# ---------------------------------------------------------------- Figure 1, Table 0, within-sex tests

# The paper's Table 1 row order (Kim et al. 2024), which every table and figure must follow.
PAPER_ORDER = [
    "Sartorius", "Rectus femoris", "Vastus lateralis", "Vastus intermedius", "Vastus medialis",
    "Adductor longus", "Adductor brevis", "Adductor magnus", "Gracilis", "Pectineus", "Gluteus maximus",
    "Gluteus medius", "Gluteus minimus", "Tensor fasciae latae", "Piriformis", "Obturator internus",
    "Obturator externus", "Quadratus femoris", "Semitendinosus", "Semimembranosus", "Biceps femoris",
]


def _flow_entries() -> list[CohortEntry]:
    """The fixture's 18 patients plus one of each exclusion: unknown fracture type, unknown sex, a muscle
    not measured, two single studies and a pair without a pre-operative baseline."""
    entries, _ = _cohort()
    first, second, third = entries[0].change, entries[1].change, entries[2].change
    entries[0] = entries[0].model_copy(update={"change": first.with_facts(fracture_type=None)})  # F FNF
    entries[1] = entries[1].model_copy(update={"change": second.with_facts(sex=None)})  # F FNF
    gone = third.model_copy(update={"structures": tuple(
        s for s in third.structures if s.name != "piriformis")})  # M FNF
    entries[2] = entries[2].model_copy(update={"change": gone})
    single = (Reason(ReasonCode.SINGLE_STUDY, "single study for this patient: nothing to compare with"),)
    entries += [CohortEntry(patient_id=f"S{i}", studies=1, reasons=single) for i in range(2)]
    entries.append(CohortEntry(patient_id="POST", studies=2, change=entries[5].change, reasons=(
        Reason(ReasonCode.NO_PREOPERATIVE_BASELINE, "no pre-operative baseline: not a pre vs post pair"),)))
    return entries


def _flow_rows(flow) -> dict[tuple[str, str], tuple[int, object]]:
    return {(r.box, r.label): (r.n, r.remaining) for r in flow.itertuples(index=False)}


def test_participant_flow_counts_every_step_and_ends_at_the_tables() -> None:
    """Figure 1's data: every patient given to the report, each rule's exclusions with their reasons,
    and the groups; the last box is the tables' n and each group the tables' group size."""
    entries = _flow_entries()
    report = build_cohort(entries, n_boot=20)
    rows = _flow_rows(report.flow)
    assert rows[("start", "patients measured by the node")] == (21, 21)
    assert rows[("excluded", "no pre/post pair")] == (3, 18)
    assert rows[("reason", "single study")][0] == 2 and rows[("reason", "no pre-operative baseline")][0] == 1
    assert rows[("excluded", "fracture type not FNF/ITF")] == (1, 17)
    assert rows[("reason", "fracture type unknown")][0] == 1
    assert rows[("excluded", "sex unknown")] == (1, 16)
    assert rows[("excluded", "analysed muscles not all measured")] == (1, 15)
    assert rows[("included", "included in the tables")] == (15, 15) and len(report.patients) == 15
    assert {g: rows[("group", g)][0] for g in GROUPS} == report.group_sizes == {
        "Female FNF": 0, "Female ITF": 10, "Male FNF": 3, "Male ITF": 2}
    assert not any(box == "excluded" and "filter" in label for box, label in rows)  # no filter given
    # every excluded patient (filters aside) is listed by name in excluded.csv, the flow names none
    assert len(report.excluded) == 6 and not report.flow["label"].str.contains("C0|S0|POST").any()


def test_participant_flow_counts_the_filter_step(tmp_path) -> None:
    """Patients a --filter leaves out are the flow's first step, named by the filter; the flow's CSV,
    page section and 80-column text carry the same numbers."""
    from reporting.cohort.flow import flow_text

    report = build_cohort(_flow_entries(), parse_filters(["sex=F"]), n_boot=20)
    rows = _flow_rows(report.flow)
    # 7 men (6 + the pair without a pre-operative baseline), the patient of unknown sex and the two
    # single studies (no change record, so no sex to match)
    assert rows[("excluded", "not matching --filter sex=F")] == (10, 11)
    assert rows[("excluded", "no pre/post pair")] == (0, 11)
    assert rows[("excluded", "fracture type not FNF/ITF")] == (1, 10)
    assert rows[("included", "included in the tables")] == (10, 10) and len(report.patients) == 10
    written = write_report(report, tmp_path / "women")
    csv_rows = _csv_rows(written["flow"])
    assert csv_rows[0] == ["step", "box", "label", "n", "remaining"]
    assert ["1", "excluded", "not matching --filter sex=F", "10", "11"] in csv_rows
    assert ["6", "group", "Female ITF", "10", ""] in csv_rows
    page = written["html"].read_text()
    assert "not matching --filter sex=F" in _html_columns(page, "label")
    assert page.index("Figure 1. Participant flow") < page.index("not matching --filter sex=F")
    text = flow_text(report.flow)
    assert max(len(line) for line in text.splitlines()) <= 80
    lines = [line.split() for line in text.splitlines()]
    assert ["-10", "not", "matching", "--filter", "sex=F"] in lines
    assert text.splitlines()[-3:] == ["    10  included in the tables", "        FNF 0 (women 0, men 0)",
                                      "        ITF 10 (women 10, men 0)"]


def test_flow_figure_draws_each_box_with_its_count() -> None:
    """Figure 1 is boxes and arrows: the start, one box per exclusion step (with its reasons), the
    included patients and one box per fracture type with its women and men."""
    import matplotlib.pyplot as plt

    from reporting.cohort.figures import flow_figure, flow_png

    report = build_cohort(_flow_entries(), n_boot=20)
    fig = flow_figure(report.flow)
    try:
        texts = [t.get_text() for t in fig.axes[0].texts]
        arrows = [c for c in fig.axes[0].get_children() if type(c).__name__ == "Annotation"]
        boxes = [c for c in fig.axes[0].patches if type(c).__name__ == "FancyBboxPatch"]
    finally:
        plt.close(fig)
    for line in ("Patients measured by the node", "n = 21", "Excluded: no pre/post pair", "n = 3",
                 "• single study: 2", "Included in the tables", "n = 15", "women 0, men 3",
                 "women 10, men 2", "Femoral neck fracture (FNF)"):
        assert line in texts, (line, texts)
    assert len(boxes) == 1 + 4 + 1 + 2  # start, four exclusion steps, included, FNF and ITF
    assert len(arrows) == 4 + 1 + 2  # to each exclusion, to the included box, to each group
    assert flow_png(report.flow)[:8] == b"\x89PNG\r\n\x1a\n"


def _median_iqr(values: list[float], digits: int) -> str:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return f"{med:.{digits}f} [{q1:.{digits}f}–{q3:.{digits}f}]"


def test_baseline_table_describes_each_group() -> None:
    """Table 0: n, age at the baseline CT (the patients with one), height with its sources, interval,
    Koval grades, fractured side and the pre-operative volume of the 21 muscles, per group and all."""
    from reporting.cohort import baseline as b

    entries, truth = _cohort()
    ages = {}
    for i, e in enumerate(entries):
        age = None if i % 4 == 0 else 60 + (i * 7) % 30
        source = "PatientSize" if i == 3 else e.change.height_source
        entries[i] = e.model_copy(update={"change": e.change.with_facts(
            baseline_age_years=age, height_source=source)})
        ages[e.patient_id] = age
    report = build_cohort(entries, n_boot=20)
    t = report.baseline
    assert list(t.index) == list(b.ROWS) and list(t.columns) == [*GROUPS, "All"]
    for g in (*GROUPS, "All"):
        pids = [p for p, tr in truth.items() if g == "All" or tr["group"] == g]
        known = [ages[p] for p in pids if ages[p] is not None]
        assert t.loc["n", g] == str(len(pids))
        assert t.loc[b.AGE, g] == _median_iqr(known, 1)
        mean_sd = f"{np.mean(known):.1f}" + (f" ± {np.std(known, ddof=1):.1f}" if len(known) > 1 else "")
        assert t.loc[b.AGE_MEAN, g] == (mean_sd if known else "–")
        assert t.loc[b.AGE_N, g] == f"{len(known)} of {len(pids)}"
        assert t.loc[b.HEIGHT, g] == _median_iqr([truth[p]["height"] for p in pids], 2)
        pre = [_total(truth[p]["pre"]) for p in pids]
        assert t.loc[b.PRE_VOLUME, g] == _median_iqr(pre, 0)
        assert t.loc[b.PRE_INDEX, g] == _median_iqr(
            [v / truth[p]["height"] ** 2 for v, p in zip(pre, pids, strict=True)], 1)
        assert t.loc[b.DAYS, g] == "120 [120–120]"
        assert t.loc[b.SIDE, g] == f"{len(pids)} / 0 / 0"  # the fixture's operated side is the left
    assert t.loc[b.HEIGHT_SOURCE, "All"] == "17 / 1 / 0"
    assert t.loc[b.HEIGHT_SOURCE, "Female FNF"] == "2 / 0 / 0"
    # the fixture's Koval grade: n % 7 + 1 for patient n, unknown when n is a multiple of 3
    grades = [n % 7 + 1 for n in range(1, 19) if n % 3]
    assert t.loc[b.KOVAL_N, "All"] == f"{len(grades)} of 18"
    assert t.loc[b.KOVAL_GRADES, "All"] == " / ".join(str(grades.count(k)) for k in range(1, 8))
    assert t.loc["community ambulatory (Koval 1–3)", "All"] == str(sum(g <= 3 for g in grades))
    assert t.loc["non-functional ambulatory (Koval 7)", "All"] == str(grades.count(7))
    assert any("without a recorded age" in n for n in report.notes)


def test_baseline_table_written_with_its_rows(cohort, written) -> None:
    """table0_baseline.csv has a named first column and the group columns; the page shows the table."""
    rows = _csv_rows(written["table0_baseline"])
    assert rows[0] == ["characteristic", *GROUPS, "All"]
    assert rows[1] == ["n", "2", "10", "4", "2", "18"]
    assert "age at baseline CT, years, median [IQR]" in written["html"].read_text()


def test_mannwhitney_within_each_sex_matches_scipy(cohort, written) -> None:
    """FNF vs ITF within women and within men (the paper's Table 3 reading): U, p and rank-biserial r as
    scipy gives them on that sex's patients, q over the 21 muscles of each sex and measure, small
    groups flagged; written to CSV, Excel and the page."""
    report, truth, _ = cohort
    t = report.mannwhitney_sex
    lab = LABEL_OF["gluteus_maximus"]
    ratio = {p: (sum(tr["pre"][lab]) - sum(tr["post"][lab])) / sum(tr["pre"][lab]) * 100
             for p, tr in truth.items()}
    for sex, name, n_fnf, n_itf in (("F", "Female", 2, 10), ("M", "Male", 4, 2)):
        a = [ratio[p] for p, tr in truth.items() if tr["sex"] == sex and tr["fracture"] == "FNF"]
        c = [ratio[p] for p, tr in truth.items() if tr["sex"] == sex and tr["fracture"] == "ITF"]
        mw = mannwhitneyu(a, c, alternative="two-sided")
        row = t.set_index(["sex", "muscle", "measure"]).loc[(name, "Gluteus maximus", "loss_pct")]
        assert (row["n_FNF"], row["n_ITF"]) == (n_fnf, n_itf) and bool(row["small_group"])
        assert row["p"] == pytest.approx(mw.pvalue) and row["U_FNF"] == pytest.approx(mw.statistic)
        assert row["rank_biserial_r"] == pytest.approx(2 * mw.statistic / (n_fnf * n_itf) - 1)
        fam = t[(t["sex"] == name) & (t["measure"] == "loss_pct") & (t["muscle"] != "Total (21 muscles)")]
        p = fam["p"].to_numpy()
        order = np.argsort(p)
        q = np.minimum.accumulate((p[order] * len(p) / np.arange(1, len(p) + 1))[::-1])[::-1]
        assert fam["q_bh"].to_numpy()[order] == pytest.approx(np.minimum(q, 1.0))
    assert len(t) == 2 * 22 * 3  # two sexes × (21 muscles + total) × three measures
    head = _csv_rows(written["stats_mannwhitney_within_sex"])[0]
    assert head[:3] == ["sex", "muscle", "measure"] and "q_bh" in head
    assert "stats_mannwhitney_within_sex" in load_workbook(written["xlsx"], read_only=True).sheetnames
    assert "FNF vs ITF within each sex" in written["html"].read_text()


def test_every_table_and_figure_lists_the_muscles_in_the_papers_order(cohort) -> None:
    """Table 1's order (anterior, medial, gluteal, then posterior): not the label order, which puts the
    posterior muscles before the gluteal ones."""
    import matplotlib.pyplot as plt

    from reporting.cohort.figures import figures

    report, _, _ = cohort
    assert list(report.table1.index[1:-1]) == PAPER_ORDER  # after the n row, before the sum
    assert list(report.table3.columns[1:-1]) == PAPER_ORDER  # after the n column, before the total
    assert list(report.loss_ratio_by_fracture.index[:-1]) == PAPER_ORDER
    tests = (report.wilcoxon, report.mannwhitney, report.mannwhitney_sex, report.bootstrap, report.sides)
    for table in tests:
        assert [m for m in dict.fromkeys(table["muscle"]) if m != "Total (21 muscles)"] == PAPER_ORDER
    assert [by_name(m).display_name for m in dict.fromkeys(report.long["muscle"])] == PAPER_ORDER
    fig = figure6(report)
    try:
        for ax in fig.axes:
            assert [t.get_text() for t in ax.get_xticklabels()] == PAPER_ORDER
    finally:
        plt.close(fig)
    assert set(figures(report)) == set(FIGURE_NAMES)  # 7 and 8 draw from the same order


def test_one_patient_id_at_two_hospitals_is_two_rows_of_excluded() -> None:
    """excluded.csv and the console read "33333, single study" twice with nothing to tell the two
    patients apart: the issuer is a column now."""
    from reporting.cohort.collect import collect

    single = (Reason(ReasonCode.SINGLE_STUDY, "single study for this patient: nothing to compare with"),)
    entries = [CohortEntry(patient_id="33333", issuer_of_patient_id=h, studies=1, reasons=single)
               for h in ("HOSP_A", "HOSP_B")]
    excluded = collect(entries)[2]
    assert list(excluded.columns) == ["patient_id", "issuer_of_patient_id", "reason"]
    assert sorted(excluded["issuer_of_patient_id"]) == ["HOSP_A", "HOSP_B"]


@pytest.mark.parametrize("note", [
    Reason(ReasonCode.COVERAGE_DIFFERS, "Follow-up covers 96 mm less below the femoral head"),
    Reason(ReasonCode.MODELS_DIFFER, "Baseline measured by model m 0.9.1, follow-up by 0.9.2"),
], ids=str)
def test_a_less_comparable_pair_stays_in_the_tables_and_is_named(note: Reason) -> None:
    """A pair whose CTs cover other lengths of thigh, or that two models measured, entered the tables
    unseen: it stays (the reader decides) and the report and patients.csv name it."""
    entries, _ = _cohort()
    change = entries[2].change
    entries[2] = entries[2].model_copy(update={"change": change.model_copy(update={"notes": (note,)})})
    report = build_cohort(entries, n_boot=50)
    flagged = report.patients.set_index("patient_id")["comparability"]
    assert flagged["C03"] == str(note.code) and (flagged.drop("C03") == "").all()
    assert any(n.startswith(f"1 patient(s) with '{note.code}'") for n in report.notes)


# ---------------------------------------------------------------- how many patients, how each p


def _page_table(page: str, heading: str) -> list[list[str]]:
    """The rows of the first table after ``heading`` on the page."""
    parser = _Tables()
    start = page.index(heading)
    parser.feed(page[start : page.index("</table>", start) + len("</table>")])
    return parser.tables[0]


def _foot_after(page: str, heading: str) -> str:
    """The footnote line under the first table after ``heading``."""
    start = page.index("</table>", page.index(heading)) + len("</table>")
    foot = re.search(r"<p class='foot'>(.*?)</p>", page[start:])
    assert foot and foot.start() <= 1, page[start : start + 200]  # right under that table
    return foot.group(1)


def _piriformis_gone(entries: list, i: int) -> None:
    """Entry ``i``'s piriformis measured 0 cm³ on both CTs: no loss ratio for that patient."""
    change = entries[i].change
    change = change.model_copy(update={"structures": tuple(
        s.model_copy(update={"pre_cm3": 0.0, "post_cm3": 0.0}) if s.name == "piriformis" else s
        for s in change.structures)})
    entries[i] = entries[i].model_copy(update={"change": change})


def test_tables_1_and_3_show_the_patients_each_figure_rests_on(tmp_path) -> None:
    """Table 1 has an n row per group; Table 3 an n per row, which is smaller for the adjusted row when
    a height is missing; a muscle's cell resting on fewer patients than its row is named in a note."""
    entries, truth = _cohort()
    by_id = {e.patient_id: i for i, e in enumerate(entries)}
    tall = entries[by_id["C07"]]  # Female ITF: no height, so no adjusted figure
    no_height = tall.change.model_copy(update={"height_m": None})
    entries[by_id["C07"]] = tall.model_copy(update={"change": no_height})
    _piriformis_gone(entries, by_id["C08"])  # Female ITF: piriformis measured 0 cm³ on both CTs
    report = build_cohort(entries, n_boot=20)
    assert report.table1.loc["n"].to_dict() == report.group_sizes
    t3 = report.table3
    assert t3.loc[("Raw loss (cm³)", "Female ITF"), "n"] == 10
    assert t3.loc[("Adjusted loss (cm³/m²)", "Female ITF"), "n"] == 9
    assert t3.loc[("Loss ratio (%)", "Female ITF"), "n"] == 10
    assert t3.loc[("Adjusted loss (cm³/m²)", "Male ITF"), "n"] == 2
    lab = LABEL_OF["vastus_lateralis"]
    with_height = [p for p, t in truth.items() if t["group"] == "Female ITF" and p != "C07"]
    assert t3.loc[("Adjusted loss (cm³/m²)", "Female ITF"), "Vastus lateralis"] == pytest.approx(np.mean(
        [(sum(truth[p]["pre"][lab]) - sum(truth[p]["post"][lab])) / truth[p]["height"] ** 2
         for p in with_height]))
    assert "Table 3, Loss ratio (%), Female ITF: Piriformis rests on 9 of 10 patients" in report.notes
    assert sum(n.startswith("Table 3") and "rests on" in n for n in report.notes) == 1  # that cell
    written = write_report(report, tmp_path / "out")
    rows = _csv_rows(written["table3_per_muscle"])
    assert rows[0][:3] == ["measure", "group", "n"]
    assert [r[2] for r in rows[1:]] == [str(int(v)) for v in t3["n"]] and "9" in [r[2] for r in rows[1:]]
    assert _csv_rows(written["table1_composition"])[1] == ["n", "4", "2", "2", "10"]
    page = written["html"].read_text()
    n_row = next(r for r in _page_table(page, "Table 3. Per-muscle mean loss") if r[0] == "n")
    assert n_row[1:] == [str(int(v)) for v in t3["n"]]
    n_row = next(r for r in _page_table(page, "Table 1. Pre-operative composition") if r[0] == "n")
    assert n_row[1:] == ["4", "2", "2", "10"]


def test_figure_8_gives_n_per_fracture_type_and_names_a_muscle_resting_on_fewer(tmp_path) -> None:
    """A 0 cm³ baseline has no loss ratio: that patient drops out of the muscle's bar in Figure 8,
    which says so (a starred tick, a legend line, a note) instead of shrinking the group silently,
    and its CSV gives each bar's n (n_FNF, n_ITF) beside the mean."""
    from reporting.cohort.figures import figure8

    entries, truth = _cohort()
    by_id = {e.patient_id: i for i, e in enumerate(entries)}
    _piriformis_gone(entries, by_id["C08"])  # Female ITF: piriformis measured 0 cm³ on both CTs
    report = build_cohort(entries, n_boot=20)
    rows = _csv_rows(write_report(report, tmp_path / "out")["figure8_loss_ratio"])
    assert rows[0] == ["muscle", "FNF", "ITF", "n_FNF", "n_ITF"]
    n = {r[0]: r[3:] for r in rows[1:]}
    assert n["Piriformis"] == ["6", "11"] and n["Total (21 muscles)"] == ["6", "12"]
    assert {tuple(v) for m, v in n.items() if m != "Piriformis"} == {("6", "12")}
    lab = LABEL_OF["piriformis"]
    itf = [p for p, t in truth.items() if t["fracture"] == "ITF" and p != "C08"]
    mean = np.mean([(sum(truth[p]["pre"][lab]) - sum(truth[p]["post"][lab])) / sum(truth[p]["pre"][lab])
                    * 100 for p in itf])
    assert float(next(r for r in rows if r[0] == "Piriformis")[2]) == pytest.approx(mean)
    assert "Figure 8, ITF: Piriformis rests on 11 of 12 patients" in report.notes
    assert sum(n.startswith("Figure 8") for n in report.notes) == 1  # FNF's piriformis is whole
    fig = figure8(report)
    try:
        ax = fig.axes[0]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == ["(A) FNF (n=6)", "(B) ITF (n=12)", "* Piriformis, ITF: n=11 of 12"]
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert [t for t in ticks if t.endswith(" *")] == ["Piriformis *"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)

def test_a_zero_difference_among_18_pairs_keeps_the_wilcoxon_p_exact() -> None:
    """A muscle measured 0 cm³ on both CTs is a zero difference: with 18 pairs scipy's default p would
    be its normal approximation; the table's is the exact one conditional on the zero, and says so."""
    from reporting.cohort.ranktests import signed_rank_exact_p

    entries, truth = _cohort()
    by_id = {e.patient_id: i for i, e in enumerate(entries)}
    _piriformis_gone(entries, by_id["C08"])
    report = build_cohort(entries, n_boot=20)
    row = report.wilcoxon.set_index(["muscle", "patients"]).loc[("Piriformis", "all")]
    lab = LABEL_OF["piriformis"]
    diff = np.array([0.0 if p == "C08" else sum(t["pre"][lab]) - sum(t["post"][lab])
                     for p, t in truth.items()])
    assert row["n"] == 18 and row["p_method"] == "exact"
    assert row["p"] == signed_rank_exact_p(diff) and row["W"] == wilcoxon(diff).statistic
    assert row["p"] != pytest.approx(wilcoxon(diff).pvalue, rel=1e-3)  # scipy's: the normal one


def test_a_tied_loss_ratio_keeps_the_mann_whitney_p_exact() -> None:
    """An FNF and an ITF patient measured alike tie on the loss ratio: scipy's default p would be its
    normal approximation; the table's is the exact one conditional on the tie, and says so."""
    from reporting.cohort.ranktests import rank_sum_exact_p

    entries, truth = _cohort()
    by_id = {e.patient_id: i for i, e in enumerate(entries)}
    fnf, itf = entries[by_id["C01"]].change, entries[by_id["C07"]].change
    same = next(s for s in fnf.structures if s.name == "gluteus_maximus")
    itf = itf.model_copy(update={"structures": tuple(
        same if s.name == same.name else s for s in itf.structures)})
    entries[by_id["C07"]] = entries[by_id["C07"]].model_copy(update={"change": itf})
    report = build_cohort(entries, n_boot=20)
    row = report.mannwhitney.set_index(["muscle", "measure"]).loc[("Gluteus maximus", "loss_pct")]
    ratio = {e.patient_id: next(s.loss_pct for s in e.change.structures if s.name == same.name)
             for e in entries}
    a = np.array([ratio[p] for p, t in truth.items() if t["fracture"] == "FNF"])
    b = np.array([ratio[p] for p, t in truth.items() if t["fracture"] == "ITF"])
    assert ratio["C01"] == ratio["C07"] and (a.size, b.size) == (6, 12)
    assert row["p_method"] == "exact" and row["p"] == rank_sum_exact_p(a, b)
    assert row["U_FNF"] == mannwhitneyu(a, b).statistic
    assert row["p"] != pytest.approx(mannwhitneyu(a, b).pvalue, rel=1e-3)  # scipy's: the normal one


# The paper's Table 3 loss ratios (%) by sex (F, M) and its text's Figure 8 values, sexes merged
PAPER_RATIOS = {  # muscle: (FNF F, FNF M, ITF F, ITF M), (Figure 8 FNF, ITF)
    "Vastus lateralis": ((23.0, 41.2, 43.4, 33.8), (35.1, 41.8)),
    "Vastus intermedius": ((21.4, 37.0, 45.4, 39.8), (31.8, 44.4)),
    "Vastus medialis": ((19.3, 29.6, 35.6, 30.4), (26.1, 34.7)),
    "Adductor magnus": ((14.4, 31.2, 41.9, 26.9), (25.6, 39.4)),
    "Gluteus maximus": ((15.4, 34.4, 37.7, 38.0), (28.0, 37.8)),
    "Gluteus medius": ((11.8, 29.4, 39.0, 26.2), (23.5, 36.9)),
    "Sartorius": ((16.8, 42.8, 44.8, 45.2), (34.2, 44.9)),
    "Rectus femoris": ((3.3, 27.9, 37.8, 17.6), (19.7, 34.5)),
    "Adductor longus": ((12.4, 28.3, 43.7, 44.3), (23.0, 43.8)),
}


def test_figure_8_pools_the_patients_as_the_paper_does() -> None:
    """Figure 8 merges the sexes by pooling the patients (FNF 2 women + 4 men, ITF 10 + 2), not by
    averaging the two sexes' means: from the paper's Table 3 ratios that reproduces every Figure 8
    value its text gives, to the 0.1 of rounding (the sexes' plain mean misses by up to 6.8)."""
    import pandas as pd

    from reporting.cohort.statistics import loss_ratio_by_fracture

    name = {by_name(m).display_name: m for m in ANALYSED_MUSCLES}
    sizes = (("FNF", 2), ("FNF", 4), ("ITF", 10), ("ITF", 2))
    rows, patients = [], []
    for i, (fracture, n) in enumerate(sizes):
        for k in range(n):
            pid = f"{i}-{k}"
            patients.append({"patient_id": pid, "fracture_type": fracture, "loss_pct": 30.0})
            rows += [{"patient_id": pid, "fracture_type": fracture, "muscle": name[m], "loss_pct": r[i]}
                     for m, (r, _) in PAPER_RATIOS.items()]
    t = loss_ratio_by_fracture(pd.DataFrame(rows), pd.DataFrame(patients))
    for muscle, (_, (fnf, itf)) in PAPER_RATIOS.items():
        assert t.loc[muscle, "FNF"] == pytest.approx(fnf, abs=0.1), muscle
        assert t.loc[muscle, "ITF"] == pytest.approx(itf, abs=0.1), muscle
        assert (t.loc[muscle, "n_FNF"], t.loc[muscle, "n_ITF"]) == (6, 12)


def test_paper_variant_of_table2_counts_muscles_not_patients(cohort, written) -> None:
    """The paper variant describes 21 per-muscle means: its count reads "n muscles" (21), beside the
    patients behind each mean, so no one takes 21 for the number of patients."""
    report, _, _ = cohort
    t = report.table2_across_muscles
    assert "n" not in t.index and list(t.index[:2]) == ["n muscles", "n patients"]
    assert (t.loc["n muscles"] == 21).all()
    for kind in ("Raw (cm³)", "Adjusted (cm³/m²)"):
        assert {g: t.loc["n patients", (kind, g)] for g in GROUPS} == report.group_sizes
    labels = [r[0] for r in _csv_rows(written["table2_across_muscles"])]
    assert "n" not in labels and {"n muscles", "n patients"} <= set(labels)
    page = written["html"].read_text()
    rows = _page_table(page, "Table 2 (paper variant)")
    assert [r[0] for r in rows if r[0].startswith("n")] == ["n muscles", "n patients"]
    assert "counts muscles, not patients" in _section(page, "Table 2 (paper variant)")


def test_rank_tests_name_how_each_p_was_computed() -> None:
    """Each p's label says how it was computed: signed-rank exact up to 50 pairs (scipy's exact p
    without ties; with ties or zeros the exact conditional one, tests/test_ranktests.py), else scipy's
    normal approximation; Mann–Whitney exact up to 66 patients (scipy's exact p without ties; with
    ties the exact conditional one), above that scipy's exact p without ties and a group of 8 or
    fewer, else the normal approximation."""
    from reporting.cohort.ranktests import (
        PMethod,
        rank_sum,
        rank_sum_exact_p,
        signed_rank,
        signed_rank_exact_p,
    )

    rng = np.random.default_rng(1)
    zeros = np.zeros
    paired = [
        (rng.normal(size=6), zeros(6), PMethod.EXACT),
        (rng.normal(size=50), zeros(50), PMethod.EXACT),
        (np.array([1.0, 2, 2, 3, -1, 4, 5, 0]), zeros(8), PMethod.EXACT),  # ties and a zero
        (np.r_[np.arange(1.0, 20), 3.0], zeros(20), PMethod.EXACT),  # a tie, 20 pairs
        (rng.normal(size=51), zeros(51), PMethod.NORMAL),
    ]
    for x, y, method in paired:
        res = signed_rank(x, y)
        assert res.method is method and res.statistic == wilcoxon(x, y).statistic
        if method is PMethod.EXACT:
            assert res.p == signed_rank_exact_p(x - y)
        else:
            assert res.p == pytest.approx(wilcoxon(x, y).pvalue, rel=1e-12)
    groups = [  # a, b, method, scipy's method giving the same p (None: only ours is exact)
        (rng.normal(size=2), rng.normal(size=10), PMethod.EXACT, "exact"),
        (rng.normal(size=9), rng.normal(size=9), PMethod.EXACT, "exact"),
        (np.array([1.0, 2, 3]), np.array([3.0, 4, 5, 6]), PMethod.EXACT, None),  # a tie
        (np.r_[np.arange(1.0, 33), 3.0], np.arange(20.0, 53), PMethod.EXACT, None),  # 66, ties
        (rng.normal(size=8), rng.normal(size=59), PMethod.EXACT, "exact"),  # 67, no ties
        (rng.normal(size=9), rng.normal(size=58), PMethod.NORMAL, "asymptotic"),
    ]
    for a, b, method, scipy_method in groups:
        res = rank_sum(a, b)
        assert res.method is method and res.statistic == mannwhitneyu(a, b).statistic
        if scipy_method is None:
            assert res.p == rank_sum_exact_p(a, b)
            assert res.p != pytest.approx(mannwhitneyu(a, b).pvalue, rel=1e-3)  # scipy's: normal
        else:
            scipys = mannwhitneyu(a, b, alternative="two-sided", method=scipy_method).pvalue
            assert res.p == pytest.approx(scipys, rel=1e-12)


def test_method_line_counts_the_rows_of_each_method() -> None:
    from reporting.cohort.ranktests import RANK_SUM, SIGNED_RANK, method_line

    line = method_line(SIGNED_RANK, ["exact", "exact", "normal approximation"])
    assert line.startswith("Test: two-sided Wilcoxon signed-rank test (zero differences dropped), scipy ")
    assert line.endswith("p-values: exact (all 2ⁿ sign assignments, tied differences at their "
                         "mid-ranks) in 2 rows, normal approximation (tie-corrected, no continuity "
                         "correction) in 1 row (column p_method).")
    assert method_line(RANK_SUM, ["exact"] * 3).endswith(
        "p-values: exact (all C(N, m) splits of the patients, tied values at their mid-ranks) in all"
        " 3 rows.")
    assert method_line(RANK_SUM, []).endswith("p-values: none (too few patients).")


def test_page_says_under_each_test_table_which_test_and_how_p_was_computed(tmp_path) -> None:
    """34 FNF against 33 ITF patients: 67, above the exact Mann–Whitney's 66, so the pooled test is
    the normal approximation, within each sex (20 vs 20, 14 vs 13) exact; the signed-rank test is
    the normal approximation in all 67 patients and exact per fracture type (34, 33 pairs); each
    table's footnote and p_method column say so, and the normal p-values are scipy's."""
    composition = [("FNF", "F", 20), ("FNF", "M", 14), ("ITF", "F", 20), ("ITF", "M", 13)]
    entries, truth = _cohort(composition=composition)
    report = build_cohort(entries, n_boot=20)
    assert set(report.mannwhitney["p_method"]) == {"normal approximation"}
    assert set(report.mannwhitney_sex["p_method"]) == {"exact"}
    methods = report.wilcoxon.groupby("patients")["p_method"].unique().to_dict()
    assert {k: list(v) for k, v in methods.items()} == {
        "all": ["normal approximation"], "FNF": ["exact"], "ITF": ["exact"]}
    assert set(report.sides["p_method"]) == {"normal approximation"}
    lab = LABEL_OF["gluteus_maximus"]
    ratio = {p: (sum(t["pre"][lab]) - sum(t["post"][lab])) / sum(t["pre"][lab]) * 100
             for p, t in truth.items()}
    fnf = [ratio[p] for p, t in truth.items() if t["fracture"] == "FNF"]
    itf = [ratio[p] for p, t in truth.items() if t["fracture"] == "ITF"]
    row = report.mannwhitney.set_index(["muscle", "measure"]).loc[("Gluteus maximus", "loss_pct")]
    assert row["p"] == pytest.approx(mannwhitneyu(fnf, itf, method="asymptotic").pvalue)
    written = write_report(report, tmp_path / "out")
    head = _csv_rows(written["stats_mannwhitney"])[0]
    assert head[head.index("p") + 1] == "p_method"
    page = written["html"].read_text()
    signed = "Test: two-sided Wilcoxon signed-rank test (zero differences dropped), scipy"
    assert _foot_after(page, "Wilcoxon signed-rank, pre vs post").startswith(signed)
    assert _foot_after(page, "Wilcoxon signed-rank, pre vs post").endswith(
        "exact (all 2ⁿ sign assignments, tied differences at their mid-ranks) in 44 rows, normal "
        "approximation (tie-corrected, no continuity correction) in 22 rows (column p_method).")
    assert _foot_after(page, "Mann–Whitney U, FNF vs ITF (").endswith(
        "normal approximation (tie- and continuity-corrected) in all 66 rows.")
    assert _foot_after(page, "Mann–Whitney U, FNF vs ITF within each sex").endswith(
        "exact (all C(N, m) splits of the patients, tied values at their mid-ranks) in all 132 rows.")
    assert _foot_after(page, "Operated vs contralateral side").startswith(signed)
    assert set(_html_columns(page, "p_method")) == {"exact", "normal approximation"}
