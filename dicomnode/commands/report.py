"""Sub-commands: ``report cohort --out DIR [--filter KEY=VALUE ...]``, ``report patient PATIENT``.

The cohort report reproduces the seed paper's Tables 1–3 and Figures 6–8 (plus the statistics it could
not run) from everything the node has measured; the patient report shows one patient's changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dicomnode.commands.common import ConfigOption, cell, node_settings, wrapped
from seg.dates import display_date
from seg.records import ChangeRecord, Followup

if TYPE_CHECKING:
    from dicomnode.clinical.pairing import TimelineRow
    from dicomnode.config import Settings

report_app = typer.Typer(help="Cohort and per-patient change reports.", no_args_is_help=True)


@report_app.command("cohort")
def cohort(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for CSV, Excel, PNG and report.html.")],
    filters: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            help="KEY=VALUE[,VALUE] on the change record, e.g. fracture_type=FNF, sex=F, "
            "fractured_side=left, koval_grade=1 (repeatable; sex, fracture type and side in the "
            "registry's words: Female, L, femoral neck ...).",
        ),
    ] = None,
    followup: Annotated[
        Followup, typer.Option(help="Which follow-up pairs with the baseline.")
    ] = Followup.LAST,
    bootstrap: Annotated[
        int, typer.Option(min=10, help="Bootstrap resamples for the confidence intervals.")
    ] = 2000,
    config: ConfigOption = None,
) -> None:
    """Write the cohort report (paper's Figure 1 flow, Tables 0–3, Figures 6–8, statistics) to --out."""
    from dicomnode.clinical import pairing, registry
    from reporting.cohort.collect import parse_filters
    from reporting.cohort.flow import flow_text
    from reporting.cohort.report import build_cohort, table2_numbers, write_report

    vocabulary = {"sex": registry.parse_sex, "fracture_type": registry.parse_fracture_type,
                  "fractured_side": registry.parse_side}
    try:
        parsed = parse_filters(filters, vocabulary)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--filter") from exc
    settings = node_settings(config)
    report = build_cohort(pairing.cohort_entries(settings, followup=followup), parsed, n_boot=bootstrap)
    written = write_report(report, out)
    typer.echo(
        f"{len(report.patients)} pair(s): " + ", ".join(f"{g} {n}" for g, n in report.group_sizes.items())
    )
    for note in report.notes:  # within 80 columns, continuation lines indented under the text
        typer.echo(wrapped(note, "note: ", " " * 6))
    for _, row in report.excluded.iterrows():
        issuer = f" ({row['issuer_of_patient_id']})" if row["issuer_of_patient_id"] else ""
        typer.echo(f"not included: {row['patient_id']}{issuer}: {row['reason']}")
    typer.echo(flow_text(report.flow))
    typer.echo(table2_numbers(report))
    typer.echo(f"report: {written['html']}")


@report_app.command("patient")
def patient(
    patient_id: Annotated[str, typer.Argument(help="PatientID")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write change-*.json and CSV here.")] = None,
    issuer: Annotated[str | None, typer.Option(help="IssuerOfPatientID (default: any)")] = None,
    config: ConfigOption = None,
) -> None:
    """Per-muscle change of one patient (each follow-up vs baseline and previous study)."""
    import pandas as pd

    from dicomnode.clinical import pairing

    settings = node_settings(config)
    rows = pairing.timeline(settings, patient_id, issuer)
    changes = [c for r in rows for c in r.changes]
    if not rows:
        typer.echo(f"no measured studies for patient {patient_id}", err=True)
        raise typer.Exit(1)
    issuers = sorted({r.issuer_of_patient_id for r in rows})
    if len(issuers) > 1:  # their reasons and changes were merged into one report
        named = ", ".join(repr(i) if i else "'' (none)" for i in issuers)
        raise typer.BadParameter(f"PatientID {patient_id} is used by {len(issuers)} issuers ({named}), each a"
                                 " patient of its own: choose one", param_hint="--issuer")
    if not changes:
        reasons = sorted({w.text for r in rows for w in r.reasons})
        typer.echo(wrapped("no comparison: " + ("; ".join(reasons) or "no reason recorded"), "", "  "))
        for line in _requests(settings, rows):  # a baseline the node asked the PACS for
            typer.echo(wrapped(line, "  · ", " " * 4))
        raise typer.Exit(0)
    for c in changes:
        typer.echo(
            f"\n{c.comparison}: {display_date(c.baseline.study_date)} → "
            f"{display_date(c.followup.study_date)} ({c.days_between} days)\n"
            f"  height {c.height_m or '–'} m ({c.height_source}); fracture {c.fracture_type or 'unknown'}, "
            f"side {c.fractured_side or 'unknown'}"
        )
        for note in c.notes:
            typer.echo(wrapped(note.text, "  · ", " " * 4))
        typer.echo(side_table(c))
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            stem = f"change-{c.comparison}-{c.followup.series_instance_uid}"
            c.save(out / f"{stem}.json", indent=2)
            pd.DataFrame([s.model_dump() for s in c.structures]).to_csv(out / f"{stem}.csv", index=False)


def _requests(settings: Settings, rows: list[TimelineRow]) -> list[str]:
    """Where each of these studies' baseline requests to the PACS stands (none: never asked)."""
    from dicomnode.clinical.prior_requests import requests_by_study
    from dicomnode.db import opened

    with opened(settings.db_path) as db:
        asked = requests_by_study(db.con)
    keys = [(r.study.patient_id, r.issuer_of_patient_id, r.study.study_instance_uid) for r in rows]
    return [asked[k].text(settings.send.attempts) for k in keys if k in asked]


def side_table(change: ChangeRecord) -> str:
    """Each structure's volume before and after, and its loss, per side (the fractured side first when
    known), then the analysed muscles together; display names, within 80 columns."""
    from seg.labels import by_name, reading_order
    from seg.records import other_side

    known = change.fractured_side is not None
    first = change.fractured_side or "left"
    second = other_side(first)
    by_key = {(st.name, st.side): st for st in change.structures}
    names = sorted({st.name for st in change.structures}, key=reading_order)

    def cells(name: str, side: str) -> str:
        st = by_key.get((name, side))
        values = (None, None, None) if st is None else (st.pre_cm3, st.post_cm3, st.loss_pct)
        return "".join(f"{cell(v, '.1f'):>9}" for v in values)

    heads = (f"fractured side: {first}", f"other side: {second}") if known else ("left", "right")
    lines = [f"{'':<21}{heads[0]:>27}  {heads[1]:>27}",
             f"{'structure':<21}" + f"{'pre cm³':>9}{'post cm³':>9}{'loss %':>9}  " * 2]
    lines += [f"{by_name(n).display_name:<21}{cells(n, first)}  {cells(n, second)}" for n in names]
    t = change.total_analysed_muscles
    if t.pre_cm3 is not None and t.post_cm3 is not None:
        lines += [f"the {t.structures} analysed muscles, both sides: {t.pre_cm3:.0f} → {t.post_cm3:.0f} cm³",
                  f"  change {cell(t.delta_cm3, '+.1f')} cm³, loss {cell(t.loss_pct, '.1f')} %, "
                  f"height²-adjusted {cell(t.delta_index_cm3_m2, '+.1f')} cm³/m²"]
    return "\n".join(line.rstrip() for line in lines)


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the main app."""
    app.add_typer(report_app, name="report")
