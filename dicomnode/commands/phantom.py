"""Sub-commands: ``phantom`` (synthetic thigh CT with ground truth) and ``volumes`` (measure a label map)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dicomnode.commands.common import bad_input, spacing_option, volumes_table, z_range_option


def _fov_option(text: str | None) -> tuple[float, float] | None:
    """``--fov`` as two positive mm, "400,300" or "400x300"."""
    if not text:
        return None
    try:
        parts = [float(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        parts = []
    if len(parts) != 2 or min(parts) <= 0:
        raise typer.BadParameter(f"give two positive numbers in mm, e.g. 400x300 (got {text!r})",
                                 param_hint="--fov")
    return parts[0], parts[1]


def _parse_atrophy(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for it in (part for item in items for part in item.split(",") if part.strip()):
        name, sep, val = it.partition("=")
        if not sep:
            raise typer.BadParameter(f"expects NAME=FACTOR, got {it!r}", param_hint="--atrophy")
        try:
            out[name.strip()] = float(val)
        except ValueError:
            raise typer.BadParameter(f"expects NAME=FACTOR, got {it!r}", param_hint="--atrophy") from None
    return out


def phantom(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (dicom/ and truth/ are created).")],
    seed: Annotated[int, typer.Option(help="Patient seed: same seed, same patient.")] = 0,
    spacing: Annotated[str, typer.Option(help="Voxel spacing column,row,slice in mm (or one number).")]
    = "1.5,1.5,3",
    slice_thickness: Annotated[float | None, typer.Option(help="Slice thickness mm (default: spacing).")]
    = None,
    position: Annotated[str, typer.Option(help="Patient position: HFS or FFS.")] = "HFS",
    slice_order: Annotated[str, typer.Option(help="Instance numbering: ascending (feet first), descending.")]
    = "ascending",
    patient_id: Annotated[str | None, typer.Option(
        help="PatientID (default PHANTOM and the seed in four digits: PHANTOM0007).")] = None,
    patient_name: Annotated[str | None, typer.Option(help="PatientName (default Phantom^Seed<seed>).")]
    = None,
    study_date: Annotated[str, typer.Option(help="StudyDate YYYYMMDD.")] = "20240101",
    study_time: Annotated[str, typer.Option(help="StudyTime HHMMSS.")] = "120000",
    sex: Annotated[str | None, typer.Option(help="F or M (default: random by seed).")] = None,
    height: Annotated[float | None, typer.Option(help="Height in m (default: random by seed and sex).")]
    = None,
    no_height: Annotated[bool, typer.Option("--no-height", help="Leave PatientSize out of the header.")]
    = False,
    postop: Annotated[bool, typer.Option("--postop", help="Post-operative study (implant/atrophy apply).")]
    = False,
    atrophy: Annotated[list[str] | None, typer.Option(help="NAME=FACTOR volume kept (repeat or comma-list).")]
    = None,
    implant: Annotated[str | None, typer.Option(help="Operated side with metal implant: left or right.")]
    = None,
    fat_infiltration: Annotated[float, typer.Option(help="0..1 fat mixed into muscle HU.")] = 0.0,
    transfer_syntax: Annotated[str, typer.Option(help="explicit, rle, jpegls or j2k.")] = "explicit",
    z_range: Annotated[str | None, typer.Option(help="z range lo,hi in mm about the femoral head.")] = None,
    fov: Annotated[str | None, typer.Option(help="In-plane FOV x,y in mm (default: fit the body).")] = None,
    study_uid: Annotated[str | None, typer.Option(help="StudyInstanceUID (default derived).")] = None,
    series_number: Annotated[int, typer.Option(help="SeriesNumber.")] = 1,
    no_noise: Annotated[bool, typer.Option("--no-noise", help="No CT noise.")] = False,
) -> None:
    """Write a synthetic thigh CT series with its ground truth (labels.nii.gz, volumes.json)."""
    import time

    from seg.height import PLAUSIBLE_RANGE_TEXT, plausible_height
    from seg.phantom import TRANSFER_SYNTAXES, PhantomOptions, make_phantom, write_phantom

    if height is not None and not plausible_height(height):  # its truth volumes.json uses the height
        raise typer.BadParameter(f"outside the plausible {PLAUSIBLE_RANGE_TEXT}", param_hint="--height")
    if implant not in (None, "left", "right"):  # said here by its option, not the field it fills
        raise typer.BadParameter("--implant must be left or right")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise typer.BadParameter(f"choose one of {', '.join(TRANSFER_SYNTAXES)}",
                                 param_hint="--transfer-syntax")
    try:
        opts = PhantomOptions(
            seed=seed, spacing_mm=spacing_option(spacing), slice_thickness_mm=slice_thickness,
            position=position.upper(), slice_order=slice_order,
            patient_id=patient_id, patient_name=patient_name, study_date=study_date, study_time=study_time,
            sex=sex.upper() if sex else None, height_m=height, postop=postop or bool(implant),
            atrophy=_parse_atrophy(atrophy or []), fat_infiltration=fat_infiltration, implant_side=implant,
            study_uid=study_uid, write_height=not no_height, z_range_mm=z_range_option(z_range),
            fov_mm=_fov_option(fov), noise=not no_noise, series_number=series_number,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    t0 = time.perf_counter()
    ph = make_phantom(opts)
    t1 = time.perf_counter()
    write_phantom(ph, out, TRANSFER_SYNTAXES[transfer_syntax])
    t2 = time.perf_counter()
    grid = "×".join(str(n) for n in ph.ct.shape)
    spacing = "×".join(f"{v:g}" for v in ph.ct.spacing_mm)
    Console(highlight=False).print(
        f"phantom seed {seed}: {ph.sex}, {ph.height_m:.2f} m, {opts.position}, "
        f"{grid} voxels of {spacing} mm\n"
        f"  written to {out} (make {t1 - t0:.1f} s, write {t2 - t1:.1f} s)", soft_wrap=True)


def volumes(
    ct: Annotated[Path, typer.Option("--ct", help="CT: DICOM folder or NIfTI file.")],
    labels: Annotated[Path, typer.Option("--labels", help="Label map (NIfTI) on the CT's grid.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for volumes.json and volumes.csv.")],
    height: Annotated[float | None, typer.Option(help="Height in m (default: PatientSize if present).")]
    = None,
) -> None:
    """Volumes (cm³, left/right, cm³/m²) and QA from a given label map: the ground-truth path."""
    from seg.io import load_image, load_nifti
    from seg.measure import measure_volumes, write_volumes

    with bad_input("--ct"):
        ct_vol = load_image(ct)
    with bad_input("--labels"):
        lab = load_nifti(labels) if labels.name.endswith((".nii", ".nii.gz")) else load_image(labels)
        lab = lab.aligned_to(ct_vol)  # saved by any tool: the CT's voxel order and series attributes
    try:
        rec = measure_volumes(lab, ct_vol, height_m=height, height_source="command line" if height else None,
                              model={"name": "given labels", "version": "", "demo": False})
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    jp, cp = write_volumes(rec, out)
    typer.echo(volumes_table(rec))
    Console(stderr=True).print(f"wrote {jp} and {cp}")


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the main app."""
    app.command("phantom")(phantom)
    app.command("volumes")(volumes)
