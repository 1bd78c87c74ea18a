"""Sub-commands: ``patients import FILE.csv``, ``patients list``, ``patients timeline PATIENT``.

The registry holds the clinical facts DICOM lacks (height, fracture type, surgery date); these commands
fill it and show what pairing made of each patient's studies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dicomnode.commands.common import ConfigOption, settings_from

patients_app = typer.Typer(help="Clinical registry and per-patient timelines.", no_args_is_help=True)


@patients_app.command("import")
def import_(
    csv_file: Annotated[
        Path,
        typer.Argument(
            help="CSV: patient_id, height_m, sex, fracture_type (FNF/ITF/other), "
            "fractured_side, surgery_date, koval_grade [, issuer_of_patient_id]",
            exists=True,
            dir_okay=False,
        ),
    ],
    config: ConfigOption = None,
) -> None:
    """Import (insert or replace) registry rows; re-pairs measured patients (the surgery date may move)."""
    from dicomnode.clinical import pairing, registry

    settings = settings_from(config)
    try:
        result = registry.import_csv(settings, csv_file)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="CSV_FILE") from exc
    for problem in result.problems:
        typer.echo(f"warning: {problem}", err=True)
    refreshed = pairing.refresh_all(settings)
    typer.echo(
        f"imported {result.imported} patient(s); {len(result.problems)} problem(s); "
        f"re-paired {refreshed} measured patient(s)"
    )


@patients_app.command("list")
def list_(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Registry rows and measured patients, with height provenance and comparison counts."""
    from dicomnode.clinical import pairing, registry

    settings = settings_from(config)
    measured = {(m["patient_id"], m["issuer_of_patient_id"]): m for m in pairing.patients(settings)}
    # a measured patient's registry row as pairing finds it (the exact issuer, else a row without one);
    # a registry row no measured patient uses is listed on its own
    infos = {key: registry.get_patient(settings, *key) for key in measured}
    listed = set(measured) | {(i.patient_id, i.issuer_of_patient_id) for i in infos.values() if i is not None}
    infos |= {key: p for p in registry.all_patients(settings)
              if (key := (p.patient_id, p.issuer_of_patient_id)) not in listed}
    rows = []
    for key in sorted(infos):
        info, meas = infos[key], measured.get(key, {})
        res = registry.resolve(settings, key[0], key[1], info=info) if info else None
        rows.append(
            {
                "patient_id": key[0],
                "issuer": key[1],
                "height_m": res.height_m if res else None,
                "height_source": res.height_source if res else "not in registry",
                "height_flag": info.height_flag if info else None,
                "sex": info.sex if info else None,
                "fracture_type": info.fracture_type if info else None,
                "fractured_side": info.fractured_side if info else None,
                "surgery_date": info.surgery_date if info else None,
                "koval_grade": info.koval_grade if info else None,
                "studies": meas.get("studies", 0),
                "comparisons": meas.get("comparisons", 0),
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # within 80 columns: no vertical rules, one space between columns, the issuer under the identifier
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for head in ("patient", "height", "from", "sex", "type", "side", "surgery", "Koval", "studies", "pairs"):
        table.add_column(head, overflow="fold")
    for r in rows:
        table.add_row(
            r["patient_id"] + (f"\n({r['issuer']})" if r["issuer"] else ""),
            f"{r['height_m']:.2f} m" if r["height_m"] else "–",
            r["height_source"] + (f" [{r['height_flag']}]" if r["height_flag"] else ""),
            r["sex"] or "–",
            r["fracture_type"] or "–",
            r["fractured_side"] or "–",
            r["surgery_date"] or "–",
            str(r["koval_grade"] or "–"),
            str(r["studies"]),
            str(r["comparisons"]),
        )
    Console().print(table)


@patients_app.command("timeline")
def timeline(
    patient_id: Annotated[str, typer.Argument(help="PatientID")],
    issuer: Annotated[str | None, typer.Option(help="IssuerOfPatientID (default: any)")] = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The patient's studies in order: role (baseline / follow-up / ...), reasons, and total change."""
    from dicomnode.clinical import pairing

    settings = settings_from(config)
    rows = pairing.timeline(settings, patient_id, issuer)
    if not rows:
        typer.echo(f"no measured studies for patient {patient_id}", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps([r.as_json() for r in rows], indent=2, default=str))
        return
    for r in rows:
        typer.echo(
            f"{r.study.study_date or '????????'} {r.study.study_time[:6]:6}  {r.role:<14} "
            f"series {r.study.series_instance_uid}"
        )
        for why in r.reasons:
            typer.echo(f"    · {why.text}")
        for c in r.changes:
            t = c.total_analysed_muscles
            idx = f", {t.delta_index_cm3_m2:+.1f} cm³/m²" if t.delta_index_cm3_m2 is not None else ""
            typer.echo(
                f"    vs {c.comparison} ({c.baseline.study_date}, {c.days_between} days): "
                f"21 muscles {t.pre_cm3:.0f} → {t.post_cm3:.0f} cm³ ({t.delta_cm3:+.1f} cm³, "
                f"loss {t.loss_pct:.1f} %{idx})"
            )


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the main app."""
    app.add_typer(patients_app, name="patients")
