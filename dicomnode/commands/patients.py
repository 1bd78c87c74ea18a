"""Sub-commands: ``patients import FILE.csv``, ``patients refresh``, ``patients list``,
``patients timeline PATIENT``, ``patients link A B``, ``patients unlink ID``.

The registry holds the clinical facts DICOM lacks (height, fracture type, surgery date); these commands
fill it, pair the measured patients again (after the registry or a pairing setting changed), link
two PatientIDs of one patient, and show what pairing made of each patient's studies.
"""

from __future__ import annotations

import json
import shlex
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dicomnode.commands.common import ConfigOption, echo_problems, node_settings, settings_from
from seg.dates import display_date
from seg.terminal import COLUMNS

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from dicomnode.clinical.pairing import PatientRow, RefreshCounts, TimelineRow
    from dicomnode.clinical.prior_requests import RequestState
    from dicomnode.config import Settings

patients_app = typer.Typer(help="Clinical registry and per-patient timelines.", no_args_is_help=True)


@patients_app.command("import")
def import_(
    csv_file: Annotated[
        Path,
        typer.Argument(
            help="CSV (comma, semicolon or tab): patient_id and any of issuer_of_patient_id, "
            "height_m (or height_cm), sex (F/M), fracture_type (FNF/ITF/other), fractured_side "
            "(left/right), surgery_date (YYYYMMDD or YYYY-MM-DD), koval_grade (1-7).",
            exists=True,
            dir_okay=False,
        ),
    ],
    config: ConfigOption = None,
) -> None:
    """Import registry rows from a CSV file and re-pair the measured patients.

    New patients are added, known ones updated with the values the file gives (an absent column or
    an empty cell keeps the stored value). An unknown column refuses the whole file; a bad line is
    skipped with its reason. Measured patients are paired again (the surgery date may move)."""
    from dicomnode.clinical import registry

    settings = settings_from(config)
    try:
        result = registry.import_csv(settings, csv_file)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="CSV_FILE") from exc
    for problem in result.problems:
        typer.echo(f"warning: {problem}", err=True)
    counts = _repair(settings)
    typer.echo(
        f"imported {result.imported} patient(s) ({result.imported - result.updated} new, "
        f"{result.updated} updated); {result.skipped} line(s) skipped\n"
        f"{len(result.problems)} problem(s); re-paired {counts.patients} measured patient(s)\n"
        + _comparisons(counts)
    )
    if result.problems:  # the good lines are in; a script still learns that some were not
        raise typer.Exit(1)


@patients_app.command("refresh")
def refresh(config: ConfigOption = None) -> None:
    """Pair every measured patient again with the current settings and registry, as import does.

    After a pairing setting changed (pairing.admission_window_days) or an upgrade changed a pairing
    rule: stored roles, reasons and comparisons otherwise follow it only when a study of the
    patient is next recorded. Only the node's index changes (patients timeline, report patient,
    report cohort): no SR or summary page is sent again and no PACS is asked for a prior.

    Safe while the node runs (one short transaction per patient); but a node started before the
    setting changed pairs what it records next with its old value: restart it first."""
    settings = node_settings(config)
    counts = _repair(settings)
    typer.echo(f"re-paired {counts.patients} measured patient(s), "
               f"{counts.patients_changed} with a changed pairing\n" + _comparisons(counts))


PROGRESS_LINES = 10  # at most this many progress lines, however many patients
PROGRESS_FROM = 25  # fewer patients are re-paired without one


def _repair(settings: Settings) -> RefreshCounts:
    """Re-pair every measured patient (:func:`pairing.refresh_all`), with progress on stderr when
    there are many; an index another process keeps locked ends it with exit 1 (the patients done
    are kept: run it again)."""
    from dicomnode.clinical import pairing
    from dicomnode.db import DatabaseBusy

    done_of = [0, 0]  # patients re-paired, of how many

    def progress(done: int, total: int) -> None:
        done_of[:] = done, total
        step = max(PROGRESS_FROM, -(-total // PROGRESS_LINES))
        if total >= PROGRESS_FROM and (done % step == 0 or done == total):
            typer.echo(f"re-pairing: {done}/{total} patients", err=True)

    try:
        return pairing.refresh_all(settings, progress)
    except DatabaseBusy as exc:
        echo_problems(f"the node's index stayed locked ({exc}): {done_of[0]} of {done_of[1] or '?'} "
                      "patients re-paired, the others not; run `dicomnode patients refresh`")
        raise typer.Exit(1) from exc


def _comparisons(counts: RefreshCounts) -> str:
    """The comparisons a re-pairing added, removed, changed and kept, within 80 columns."""
    return (f"comparisons: {counts.added} added, {counts.removed} removed, {counts.changed} changed, "
            f"{counts.unchanged} unchanged")


@patients_app.command("list")
def list_(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List registry rows and measured patients with the facts pairing uses.

    The height and sex pairing uses, with the height's source (registry, the DICOM PatientSize,
    missing), and the counts of studies and comparisons."""
    from dicomnode.clinical import pairing

    rows = pairing.patients(node_settings(config))
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    _print_patients(rows)


def _print_patients(rows: list[PatientRow]) -> None:
    """One table per issuer (its name above it): on a terminal within its width (80 columns hold an
    ID with its marks in 18 characters, e.g. 16 and " *"; a height flag folds); piped, one line per
    patient however wide, so grep finds an ID, a date or a flag whole (an ID and a surgery date were
    cut across lines). The surgery date as YYYY-MM-DD, as timeline and the reasons give a date;
    ``--json`` keeps the registry's YYYYMMDD."""
    from rich import box
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    tables = []
    for issuer in sorted({r.issuer for r in rows}):
        # no vertical rules, one space between columns: the box's blank divider (no cell padding)
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0)
        mine = [r for r in rows if r.issuer == issuer]
        longest = max(len(_shown_id(r)) for r in mine)  # with its marks
        # a patient ID is never cut across lines (`patients list | grep ID` found nothing); the others fold
        table.add_column("patient", no_wrap=True, min_width=longest)
        # values that grep finds whole (a date, a count) keep their width; only a flag folds
        table.add_column("height", no_wrap=True, min_width=len("1.70 m"))
        table.add_column("from", overflow="fold", min_width=len("PatientSize"))
        for head, width in (("sex", 3), ("type", 5), ("side", 5), ("surgery", 10), ("Koval", 5),
                            ("CTs", 3), ("pairs", 5)):
            table.add_column(head, no_wrap=True, min_width=width)
        for r in mine:
            table.add_row(  # Text: "[...]" in a flag or an ID is shown, not read as Rich markup
                Text(_shown_id(r)),
                f"{r.height_m:.2f} m" if r.height_m else "–",
                Text(r.height_source + (f" [{r.height_flag}]" if r.height_flag else "")),
                r.sex or "–",
                r.fracture_type or "–",
                r.fractured_side or "–",
                display_date(r.surgery_date) if r.surgery_date else "–",
                str(r.koval_grade or "–"),
                str(r.studies),
                str(r.comparisons),
            )
        tables.append((issuer, table))
    console = Console()  # piped: as wide as the tables need at least, or as COLUMNS says if wider
    if not console.is_terminal:
        wide = console.options.update_width(10_000)  # what a table takes unfolded, not capped at 80
        needed = max(Measurement.get(console, wide, table).maximum for _, table in tables)
        console = Console(width=max(console.width, needed))
    for issuer, table in tables:
        if issuer:
            console.print(f"IssuerOfPatientID {issuer}", markup=False, highlight=False)
        _print_trimmed(console, table)
    if not all(r.in_registry for r in rows):
        console.print("* not in the registry: height and sex from the DICOM header", highlight=False)
    for line in _id_notes(rows):
        console.print(line, markup=False, highlight=False)


def _print_trimmed(console: Console, table: Table) -> None:
    """The table without the spaces Rich pads each row with to the table's width, so that a line
    ends with its last value (``patients list | grep ' 2$'`` or a diff sees no padding)."""
    with console.capture() as captured:
        console.print(table)
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


LOOK_ALIKE_MARK = "≈"  # possibly the same patient as another ID
LINKED_MARK = "+"  # other IDs are linked to this one


def _shown_id(row: PatientRow) -> str:
    """The patient column: the ID and its marks (not in the registry, look-alike, linked IDs)."""
    marks = ("" if row.in_registry else "*") + (LOOK_ALIKE_MARK if row.look_alikes else "") + (
        LINKED_MARK if row.linked_ids else "")
    return row.patient_id + (f" {marks}" if marks else "")


def _id_notes(rows: list[PatientRow]) -> list[str]:
    """The footnotes of the look-alike and linked IDs, each command on a line of its own."""
    lines = []
    for r in rows:
        issuer = f" --issuer {shlex.quote(r.issuer)}" if r.issuer else ""
        for other in r.look_alikes:
            lines += [f"{LOOK_ALIKE_MARK} {r.patient_id}: possibly the same patient as "
                      f"{other.patient_id!r} (same birth date); to pair them:",
                      f"    dicomnode patients link {shlex.quote(r.patient_id)} "
                      f"{shlex.quote(other.paired_as)}" + issuer]
        if r.linked_ids:
            lines.append(f"{LINKED_MARK} {r.patient_id}: paired as one patient with the linked "
                         f"ID(s) {', '.join(map(repr, r.linked_ids))}")
    return lines


@patients_app.command("timeline")
def timeline(
    patient_id: Annotated[str, typer.Argument(help="PatientID")],
    issuer: Annotated[str | None, typer.Option(help="IssuerOfPatientID (default: any)")] = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The patient's studies in order: role (baseline / follow-up / ...), reasons, and total change."""
    from dicomnode.clinical import pairing
    from dicomnode.clinical.prior_requests import requests_by_study
    from dicomnode.db import opened

    settings = node_settings(config)
    rows = pairing.timeline(settings, patient_id, issuer)
    if not rows:
        typer.echo(f"no measured studies for patient {patient_id}", err=True)
        raise typer.Exit(1)
    with opened(settings.db_path) as db:
        asked = requests_by_study(db.con)

    def request_of(r: TimelineRow) -> RequestState | None:
        return asked.get((r.study.patient_id, r.issuer_of_patient_id, r.study.study_instance_uid))

    if as_json:
        def request_json(r: TimelineRow) -> dict[str, Any] | None:
            request = request_of(r)
            return None if request is None else request.as_json(settings.send.attempts)

        typer.echo(json.dumps([r.as_json() | {"prior_request": request_json(r)} for r in rows],
                              indent=2, default=str))
        return
    issuers, shown = {r.issuer_of_patient_id for r in rows}, None
    for r in rows:
        if len(issuers) > 1 and r.issuer_of_patient_id != shown:
            # one PatientID under several issuers: several patients, each paired on its own
            shown = r.issuer_of_patient_id
            typer.echo(f"IssuerOfPatientID {shown or '(none)'}: a patient of its own"
                       f" ({len(issuers)} issuers use this PatientID)")
        ids = {x.study.patient_id for x in rows if x.issuer_of_patient_id == r.issuer_of_patient_id}
        if len(ids) > 1 and r is next(x for x in rows if x.issuer_of_patient_id == r.issuer_of_patient_id):
            typer.echo(textwrap.fill(f"linked PatientIDs {', '.join(sorted(map(repr, ids)))}: paired as "
                                     "one patient", COLUMNS))
        typer.echo(f"{display_date(r.study.study_date):10} {r.study.study_time[:6]:6}  {r.role}"
                   + (f"  (PatientID {r.study.patient_id!r})" if len(ids) > 1 else ""))
        typer.echo(f"    series {r.study.series_instance_uid}")
        for why in r.reasons:
            typer.echo(_reason_lines(why.text))
        if (request := request_of(r)) is not None:
            typer.echo(_reason_lines(request.text(settings.send.attempts)))
        for c in r.changes:
            t = c.total_analysed_muscles
            idx = f", {t.delta_index_cm3_m2:+.1f} cm³/m²" if t.delta_index_cm3_m2 is not None else ""
            typer.echo(
                f"    vs {c.comparison} of {display_date(c.baseline.study_date)} ({c.days_between} days): "
                f"{t.structures} muscles {t.pre_cm3:.0f} → {t.post_cm3:.0f} cm³\n"
                f"      {t.delta_cm3:+.1f} cm³, loss {t.loss_pct:.1f} %{idx}"
            )


def _reason_lines(text: str) -> str:
    """A stated reason under its study, wrapped to 80 columns; a command it ends with (in
    backquotes) on a line of its own, whole, to be copied."""
    prose, _, command = text.partition("`")
    if not (text.endswith("`") and text.count("`") == 2):
        prose, command = text, ""
    out = textwrap.fill(prose.rstrip(), COLUMNS, initial_indent="    · ", subsequent_indent="      ")
    return out + (f"\n        {command.rstrip('`')}" if command else "")


@patients_app.command("link")
def link(
    patient_id: Annotated[str, typer.Argument(help="PatientID the patient is paired under")],
    other_id: Annotated[str, typer.Argument(help="PatientID of the same patient, paired with it")],
    issuer: Annotated[str, typer.Option(help="IssuerOfPatientID of both IDs")] = "",
    force: Annotated[bool, typer.Option(
        "--force", help="Link IDs whose studies give other birth dates or sexes.")] = False,
    config: ConfigOption = None,
) -> None:
    """Pair a second PatientID's studies with the first's, as one patient, and re-pair.

    For one patient measured under two IDs (12345 from the PACS, 012345 from the hospital system):
    never done by itself, since pairing two patients would report one's muscle loss from the other's
    CTs. Refused for IDs whose studies give other birth dates or sexes, unless --force. Undone by
    `dicomnode patients unlink OTHER_ID`. A follow-up whose baseline the PACS did not hold under its
    own ID is asked for again under all of them (pairing.retrieve_priors)."""
    from dicomnode.clinical import aliases
    from dicomnode.db import opened

    settings = node_settings(config)
    try:
        with opened(settings.db_path) as db, db.tx() as con:
            done = aliases.link(con, patient_id, other_id, issuer, force=force)
    except aliases.LinkRefused as exc:
        echo_problems(str(exc))
        raise typer.Exit(2) from exc
    checked = " and ".join(done.checked) or "neither birth date nor sex"
    typer.echo(f"linked {', '.join(map(repr, done.linked))} to {done.primary!r}: paired as one "
               f"patient ({checked} compared"
               + (f"; linked although {' and '.join(done.forced)})" if done.forced else ")"))
    counts = _repair(settings)
    typer.echo(f"re-paired {counts.patients} measured patient(s)\n" + _comparisons(counts))
    if settings.pairing.retrieve_priors:
        _ask_again(settings, done.primary, issuer)


def _ask_again(settings: Settings, primary: str, issuer: str) -> None:
    """Ask the PACS again, under every linked ID, for each follow-up whose baseline it had not found
    under fewer of them, and print what came of it."""
    from dicomnode.clinical import pairing
    from dicomnode.commands.priors import ask_again

    requests = pairing.answered_none_before_link(settings, primary, issuer)
    if requests:
        ask_again(settings, requests, "asked again: PatientIDs linked",
                  f"{len(requests)} follow-up(s) without a baseline, now under "
                  f"{len(requests[0].linked_ids)} linked PatientIDs")


@patients_app.command("unlink")
def unlink(
    patient_id: Annotated[str, typer.Argument(help="a linked PatientID (the second of `link`)")],
    issuer: Annotated[str, typer.Option(help="IssuerOfPatientID of the ID")] = "",
    config: ConfigOption = None,
) -> None:
    """Pair a linked PatientID's studies on their own again, and re-pair."""
    from dicomnode.clinical import aliases
    from dicomnode.db import opened

    settings = node_settings(config)
    try:
        with opened(settings.db_path) as db, db.tx() as con:
            done = aliases.unlink(con, patient_id, issuer)
    except aliases.LinkRefused as exc:
        echo_problems(str(exc))
        raise typer.Exit(2) from exc
    typer.echo(f"unlinked {done.patient_id!r} from {done.was_linked_to!r}: paired on its own")
    counts = _repair(settings)
    typer.echo(f"re-paired {counts.patients} measured patient(s)\n" + _comparisons(counts))


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the main app."""
    app.add_typer(patients_app, name="patients")
