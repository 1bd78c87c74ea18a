"""Sub-commands: ``segment`` (CT → labels, volumes and optionally the node's DICOM outputs, one
series or a batch), ``train`` (UNETR → model package), ``evaluate``."""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from dicomnode.commands.common import (
    ConfigOption,
    bad_input,
    case_source,
    device_option,
    model_lines,
    settings_from,
    spacing_option,
    volumes_table,
    z_range_option,
)
from seg import recipe
from seg.preprocess_config import ImageResampling, TrainingMetalArtefactReduction
from seg.records import CSV_COLUMNS, ClinicalTimePoint, Evaluation, ModelInfo, VolumeRecord

if TYPE_CHECKING:
    from collections.abc import Mapping

    from dicomnode.config import Settings
    from seg.model import ModelPackage
    from seg.train import TrainConfig
    from seg.volume import Volume


BATCH_CSV = "volumes.csv"
BATCH_COLUMNS = ("series", *CSV_COLUMNS)


# A dataset's label maps (seg.dataset.LABEL_NAMES) and the folders that hold truth, not CTs:
# `dicomnode phantom` writes truth/labels.nii.gz beside dicom/.
LABEL_FILES = ("labels.nii.gz", "labels.nii")
LABEL_FOLDERS = ("truth", "labels")


class CaseOutputError(Exception):
    """A series was segmented but its results could not be written (an output folder not writable,
    a SEG or SR the source header cannot make): the input was fine, so this is no usage error."""


@dataclass
class Case:
    """One series of a batch: its name (the output folder: SeriesInstanceUID, or a NIfTI file's path
    under the input folder), its files and, for DICOM, its SeriesInstanceUID."""

    name: str
    files: list[Path]
    series_uid: str | None = None


def _is_label_map(rel: Path) -> bool:
    """A label map is a NIfTI too: segmented as a CT it would be measured as a case of its own."""
    return rel.name.lower() in LABEL_FILES or any(p.lower() in LABEL_FOLDERS for p in rel.parts[:-1])


def _folder_name(text: str) -> str:
    """One safe folder name: a path's separators and odd characters become "_"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def _nifti_name(rel: Path) -> str:
    """The NIfTI's path under the input folder without its suffix (case001/ct.nii.gz: case001_ct), so
    the training layout's case001/ct.nii.gz and case002/ct.nii.gz are two cases, not one."""
    return _folder_name(rel.as_posix().removesuffix(".gz").removesuffix(".nii"))


def _refuse_shared_folders(cases: list[Case], root: Path) -> None:
    """Two cases written to one output folder: the second would overwrite the first unseen. Compared
    without case, as macOS and Windows file systems compare names."""
    seen: dict[str, Case] = {}
    for case in cases:
        other = seen.setdefault(case.name.lower(), case)
        if other is not case:
            a, b = (c.files[0].relative_to(root).as_posix() for c in (other, case))
            raise ValueError(f"{a} and {b} would both be written to <out>/{case.name}: rename one")


def find_cases(root: Path) -> list[Case]:
    """The series under ``root``: NIfTI files one each, DICOM files grouped by SeriesInstanceUID;
    label maps (``labels.nii.gz``, anything under ``truth/`` or ``labels/``) are not cases.

    Why group by UID rather than by folder: it handles one sub-folder per series and a folder of
    mixed files alike, and a series split over folders stays one series. A ValueError when two cases
    would share an output folder.
    """
    import pydicom

    groups: dict[str, list[Path]] = {}
    cases = []
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(root)
        if _is_label_map(rel):
            continue
        if f.name.endswith((".nii", ".nii.gz")):
            cases.append(Case(_nifti_name(rel), [f]))
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid:
            groups.setdefault(uid, []).append(f)
    cases += [Case(_folder_name(uid), files, uid) for uid, files in sorted(groups.items())]
    _refuse_shared_folders(cases, root)
    return cases


def _in_study_order(cases: list[Case]) -> list[Case]:
    """Cases by StudyDate and StudyTime (undated last): recorded in this order, each follow-up finds
    its baseline recorded already and gets its follow-up SR and comparison page, as on a node that
    received the studies as they were made."""
    import pydicom

    from seg.dates import da_date, tm_time

    def when(case: Case) -> tuple[str, str]:
        try:
            ds = pydicom.dcmread(case.files[0], stop_before_pixels=True,
                                 specific_tags=["StudyDate", "StudyTime"])
        except (pydicom.errors.InvalidDicomError, OSError):
            return ("99999999", "")
        return (da_date(ds.get("StudyDate")) or "99999999", tm_time(ds.get("StudyTime")) or "")

    return sorted(cases, key=when)


def _load(case: Case) -> Volume:
    from seg.io import load_dicom_series, load_image

    if len(case.files) == 1 and case.files[0].name.endswith((".nii", ".nii.gz")):
        return load_image(case.files[0])
    return load_dicom_series(sorted(case.files))  # sorted, as the node's pipeline loads a series


def write_dicom_outputs(settings: Settings, ct: Volume, labels: Volume, record: VolumeRecord,
                        model_info: ModelInfo, out: Path,
                        facts: ClinicalTimePoint = ClinicalTimePoint()) -> list[Path]:
    """The SEG, SR and summary the node would send for a first study, saved as <SOPInstanceUID>.dcm
    (``--dicom``: nothing is recorded, so nothing is compared with an earlier study)."""
    from dicomnode.processing.pipeline import _save, build_outputs

    if not ct.source_files:
        raise ValueError("--dicom needs a DICOM series (a NIfTI CT has no study to attach to)")
    built = build_outputs(settings, ct, labels, record, model_info, facts=facts)
    return [_save(ds, out) for ds in built.datasets]


def record_case(settings: Settings, ct: Volume, labels: Volume, model_info: ModelInfo,
                at_hand: Mapping[str, list[Path]]) -> VolumeRecord:
    """``--record``: the node's own job path from the label map on
    (:func:`dicomnode.processing.pipeline.report`: volumes, SEG, SR, summary, pairing, change SRs,
    the pages that show a comparison, a later study's reports when this one is its late baseline),
    into the node's storage, with nothing sent. ``at_hand``: the CTs of the other series of this run
    (a baseline's key images, a later study's reports), by SeriesInstanceUID.

    Why the node's function: what the store holds afterwards is then what the node leaves, UIDs
    included. Objects already in the series' results (sent by the node, or recorded before) are
    built again and must equal them, as in a retried job: no UID names two contents.
    """
    import tempfile

    from dicomnode.processing.pipeline import JobInput, OutputChanged, report, results_dir
    from dicomnode.processing.sources import SeriesLookup, remember_source

    series_uid = ct.header.series_instance_uid
    if not ct.source_files or series_uid is None:
        raise ValueError("--record needs a DICOM series")
    out = results_dir(settings, series_uid)
    try:
        remember_source(out, ct.source_files)
        earlier = frozenset((out / "outputs").glob("*.dcm"))
        with tempfile.TemporaryDirectory(prefix="dicomnode-record-") as work:
            job = JobInput(job_id=0, series_instance_uid=series_uid, files=sorted(ct.source_files),
                           work_dir=Path(work), outputs_in_outbox=earlier,
                           series_files=SeriesLookup.of(settings, at_hand))
            result = report(job, settings, ct, labels, model_info)
    except (OSError, ValueError, TypeError, OutputChanged) as exc:
        raise CaseOutputError(f"not recorded in full in {out}: {type(exc).__name__}: {exc}") from exc
    return VolumeRecord.load(result.volumes_json or out / "volumes.json")


def run_case(ct: Volume, pkg: ModelPackage, out: Path | None, settings: Settings | None,
             progress: bool, record: bool = False,
             at_hand: Mapping[str, list[Path]] | None = None) -> VolumeRecord:
    """Segment, measure and write one series to ``out``; DICOM outputs too when ``settings`` is given.

    ``record``: as the node's job (:func:`record_case`), the results go to the node's storage, none
    to ``out``; ``at_hand``: the other series of the run, for it."""
    from dicomnode.clinical.registry import facts_for
    from seg.infer import segment as run_segment
    from seg.io import save_nifti
    from seg.measure import measure_volumes, write_volumes

    if record and (settings is None or not ct.source_files or ct.header.series_instance_uid is None):
        raise ValueError("--record needs a DICOM series and the node's configuration")
    labels = run_segment(ct, pkg, progress=progress)
    model_info = pkg.info
    if record and settings is not None:
        return record_case(settings, ct, labels, model_info, at_hand or {})
    if out is None:
        raise ValueError("the results need an output folder (--out) unless they are recorded")
    facts = ClinicalTimePoint()
    if settings is None or not settings.db_path.is_file():  # a plausible PatientSize, else none
        rec = measure_volumes(labels, ct, model=model_info)
    else:  # as the node: its clinical registry first, then PatientSize
        resolved = facts_for(settings, ct.header)
        rec = measure_volumes(labels, ct, height_m=resolved.height_m, height_source=resolved.height_source,
                              model=model_info)
        facts = resolved.time_point(ct.header.study_date, rec.qa)
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_nifti(labels, out / "labels.nii.gz")
        write_volumes(rec, out)
    except OSError as exc:
        raise CaseOutputError(f"cannot write the results to {out}: {exc}") from exc
    if settings is not None:
        try:
            write_dicom_outputs(settings, ct, labels, rec, model_info, out / "dicom", facts=facts)
        except (OSError, ValueError, TypeError) as exc:
            raise CaseOutputError(f"volumes written to {out}, but not the SEG, SR and summary: "
                                  f"{type(exc).__name__}: {exc}") from exc
    return rec


def write_batch_csv(rows: list[tuple[str, VolumeRecord]], path: Path) -> Path:
    """One CSV of every series: one row per series and structure, with the side volumes."""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=BATCH_COLUMNS)
        w.writeheader()
        for name, rec in rows:
            for s in rec.structures:
                w.writerow({"series": name, **s.csv_row()})
    return path


def _batch_cases(root: Path) -> list[Case]:
    """``--batch``'s cases, found before the model loads: a mistyped or empty folder, or two cases
    for one output folder, is told at once and nothing is written."""
    if not root.exists():
        raise typer.BadParameter(f"{root} does not exist", param_hint="INPUT")
    if not root.is_dir():
        raise typer.BadParameter(f"{root} is not a folder (--batch reads a folder of series)",
                                 param_hint="INPUT")
    with bad_input("INPUT"):
        cases = find_cases(root)
    if not cases:
        raise typer.BadParameter(f"no DICOM series or NIfTI file under {root}", param_hint="INPUT")
    return cases


def _run_batch(cases: list[Case], pkg: ModelPackage, out: Path | None, settings: Settings | None,
               progress: bool, console: Console, record: bool) -> None:
    """Every series into ``out/<series>/`` (``record``: into the node's storage), then
    ``out/volumes.csv`` (``record`` without ``out``: none)."""
    from rich.progress import track

    rows: list[tuple[str, VolumeRecord]] = []
    failed = []
    # --record: a follow-up's page shows its baseline's key images, read from the run's own series
    at_hand = {c.series_uid: c.files for c in cases if c.series_uid is not None}
    for case in track(_in_study_order(cases) if record else cases, description="series", console=console,
                      disable=not progress):
        try:
            folder = None if out is None else out / case.name
            rows.append((case.name, run_case(_load(case), pkg, folder, settings, False, record, at_hand)))
        except ValueError as exc:  # geometry the loader cannot place, not a CT...
            failed.append(case.name)
            console.print(f"{case.name}: skipped: {exc}", style="red", markup=False)
        except CaseOutputError as exc:
            failed.append(case.name)
            console.print(f"{case.name}: {exc}", style="red", markup=False)
    measured = f"{len(rows)} series measured, {len(failed)} skipped"
    if out is None:
        console.print(measured)
    else:
        out.mkdir(parents=True, exist_ok=True)
        console.print(f"{measured} -> {write_batch_csv(rows, out / BATCH_CSV)}")
    if record and settings is not None:
        from dicomnode.processing.pipeline import results_dir

        _say_recorded(console, results_dir(settings, "<SeriesInstanceUID>") / "outputs", each=True)
    if failed:
        raise typer.Exit(1)


def _say_recorded(console: Console, outputs: Path, each: bool = False) -> None:
    """Where ``--record`` left the DICOM outputs (nothing is sent), the path on a line of its own.

    A late baseline's change SR and comparison page belong to the later study: they are in that
    study's folder beside this one."""
    whose = "each series' " if each else ""
    console.print(f"recorded in the node's storage (nothing sent); {whose}DICOM outputs in",
                  highlight=False)
    console.print(str(outputs), soft_wrap=True, highlight=False, markup=False)


def _load_input(path: Path, dicom: bool) -> Volume:
    """The one series to segment, read before the model loads: a typo costs no model load."""
    from seg.io import load_image

    with bad_input("INPUT"):
        ct = load_image(path)
    if dicom and not ct.source_files:
        raise typer.BadParameter("--dicom and --record need a DICOM series, not a NIfTI CT",
                                 param_hint="INPUT")
    return ct


def _load_package(path: Path | None, device: str, node: Settings, console: Console) -> ModelPackage:
    """The model, prepared for the node's runtime; a demo model says so first."""
    from seg.model import load_model
    from seg.package import ModelPackageError
    from seg.runtime import prepare

    try:
        pkg = load_model(path, device=device)
    except (ModelPackageError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--model") from e
    pkg = prepare(pkg, node.worker.runtime)
    if pkg.info.demo:
        console.print("\n".join(model_lines(pkg.info)), style="yellow", markup=False, highlight=False,
                      soft_wrap=True)
    return pkg


def _check_out(out: Path | None, record: bool, batch: bool) -> None:
    """``--out`` where something is written to it, and only there: ``--record`` keeps a series'
    results in the node's storage, so one series recorded has nothing for it (an option taken and
    ignored would hide where the results went); a recorded batch may still write its volumes.csv."""
    if out is None and not record:
        raise typer.BadParameter("give the folder for the results (--record keeps them in the "
                                 "node's storage instead)", param_hint="--out")
    if out is not None and record and not batch:
        raise typer.BadParameter("--record keeps the series' results in the node's storage (it prints "
                                 "where): leave out --out, which only --batch uses with --record, for "
                                 "its volumes.csv", param_hint="--out")


def segment(
    input: Annotated[Path, typer.Argument(help="DICOM series folder or NIfTI CT (--batch: a folder "
                                          "of series).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (labels.nii.gz, volumes.json, "
                                  "volumes.csv). Not with --record, which keeps the results in the "
                                  "node's storage: there only --batch's volumes.csv, if given.")
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Model package folder (default: the configuration's "
                                  "model_path, else the shipped demo model).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", parser=device_option)] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    dicom: Annotated[bool, typer.Option(
        "--dicom", help="Also write the SEG, SR and summary the node would send (same UIDs) to "
        "<out>/dicom/.")] = False,
    batch: Annotated[bool, typer.Option(
        "--batch", help="INPUT holds many series (sub-folders or mixed files, grouped by "
        "SeriesInstanceUID): one <out>/<series>/ each and one <out>/volumes.csv.")] = False,
    record: Annotated[bool, typer.Option(
        "--record", help="Also record each series in the node's index (--config: its storage) with "
        "the node's own job path, so `patients` and `report` pair and report them (archived "
        "studies): the change SR and comparison page of each follow-up whose baseline is recorded, "
        "whichever is recorded first (--batch records in study order). Implies --dicom; the results "
        "are kept in the node's storage, not in --out; nothing is sent.")] = False,
    config: ConfigOption = None,
) -> None:
    """Segment the 29 structures of a thigh CT and measure their volumes."""
    import time

    console = Console(stderr=True)
    _check_out(out, record, batch)
    node = settings_from(config)  # the node's model_path and runtime, as the node would segment
    # [output] decides the objects, as on the node
    settings = node if dicom or record else None
    if settings is not None and record:
        if not settings.pairing.enabled:
            raise typer.BadParameter("pairing.enabled is false in this configuration", param_hint="--record")
        settings.pairing.retrieve_priors = False  # offline: never ask a PACS for priors
    if batch:
        cases = _batch_cases(input)
        _run_batch(cases, _load_package(model or node.model_path, device, node, console), out, settings,
                   progress, console, record)
        return
    ct = _load_input(input, settings is not None)
    pkg = _load_package(model or node.model_path, device, node, console)
    t = time.perf_counter()
    try:  # the input was read above: what fails now is no usage error
        rec = run_case(ct, pkg, out, settings, progress, record)
    except CaseOutputError as exc:
        console.print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc
    shape = " × ".join(str(n) for n in ct.shape)
    took = f"segmented {shape} voxels in {time.perf_counter() - t:.1f} s"
    if record and settings is not None and ct.header.series_instance_uid is not None:
        from dicomnode.processing.pipeline import results_dir

        console.print(took)
        _say_recorded(console, results_dir(settings, ct.header.series_instance_uid) / "outputs")
    else:
        console.print(f"{took} -> {out}")
    typer.echo(volumes_table(rec))




def train(
    out: Annotated[Path | None, typer.Option("--out", help="Model package folder to write (not with "
                                             "--check).")] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="Dataset folder: one folder per case with ct.nii.gz or dicom/ and labels.nii.gz "
            "(our classes 0..29, or the site's values with a labels.csv in DIR: docs/models.md)."
        ),
    ] = None,
    phantoms: Annotated[int, typer.Option("--phantoms", help="Train on N synthetic phantoms.")] = 0,
    seed_start: Annotated[int, typer.Option("--seed-start", help="First phantom seed.")] = 1000,
    val_phantoms: Annotated[
        int,
        typer.Option(help="Extra phantoms (next seeds) for validation, post-operative first."),
    ] = 1,
    postop_share: Annotated[
        float, typer.Option(help=f"Share of post-operative training phantoms: {recipe.POSTOP_SHARES_TEXT}.")
    ] = 0.25,
    atrophy_kept_min: Annotated[
        float, typer.Option(help="Least volume share an atrophied muscle of a post-operative training "
                            f"phantom keeps (above 0, at most {recipe.ATROPHY_KEPT_MIN:g}, the held-out "
                            "plan's).")
    ] = recipe.ATROPHY_KEPT_MIN,
    postop_weight: Annotated[
        float, typer.Option(help="How much more often crops come from post-operative phantoms (1: as often).")
    ] = 1.0,
    streak_prob: Annotated[
        float, typer.Option(help="Share of crops that get metal streaks drawn over them (0 to 1; 0: none).")
    ] = 0.0,
    implant_crop_prob: Annotated[
        float, typer.Option(help="Share of the crops from a case with an implant that centre on its metal "
                            "(0 to 1; 0: none).")
    ] = 0.0,
    checkpoints: Annotated[Path, typer.Option("--checkpoints", help="Checkpoint + cache folder.")] = Path(
        "checkpoints/run"
    ),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from last.pt in --checkpoints.")] = False,
    init_from: Annotated[
        Path | None,
        typer.Option("--init-from", help="Start from this package's weights (same architecture and spacing), "
                     "e.g. seg/models/demo to continue the shipped demo model without its checkpoints."),
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1000,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this wall time.")] = None,
    batch_size: Annotated[int, typer.Option(help="Crops per step.")] = recipe.BATCH_SIZE,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = recipe.LR,
    spacing: Annotated[str, typer.Option(help="Model grid spacing mm (one or three numbers).")] = (
        f"{recipe.SPACING_MM:g}"),
    roi: Annotated[int, typer.Option(help="Cubic ROI edge (voxels, multiple of 16).")] = (
        recipe.DEMO_UNETR["img_size"][0]),
    hidden_size: Annotated[int, typer.Option(help="UNETR hidden size (paper: 768).")] = (
        recipe.DEMO_UNETR["hidden_size"]),
    num_heads: Annotated[int, typer.Option(help="Attention heads (paper: 12).")] = (
        recipe.DEMO_UNETR["num_heads"]),
    mlp_dim: Annotated[int, typer.Option(help="Transformer MLP size (paper: 3072).")] = (
        recipe.DEMO_UNETR["mlp_dim"]),
    feature_size: Annotated[int, typer.Option(help="Decoder feature size (paper: 16).")] = (
        recipe.DEMO_UNETR["feature_size"]),
    val_every: Annotated[int, typer.Option(help="Validate every N steps.")] = 100,
    z_range: Annotated[
        str | None, typer.Option(help="Phantom z range mm 'lo,hi' (small test phantoms).")
    ] = None,
    name: Annotated[str, typer.Option(help="Model name in the package.")] = "thigh-unetr-site",
    version: Annotated[str, typer.Option(help="Model version.")] = "0.1.0",
    demo: Annotated[
        bool, typer.Option("--demo", help="Mark as a phantom-trained demonstration model.")
    ] = False,
    dice_batch: Annotated[bool, typer.Option(help="Dice over the whole batch (not per crop).")] = True,
    decay_start: Annotated[float, typer.Option(help="Fraction of the run after which the LR decays.")] = 0.7,
    crop: Annotated[
        recipe.Crop, typer.Option(metavar="<mode>", help="Crop centres: 'foreground' (any labelled voxel) "
                                  "or 'classes' (a structure drawn uniformly, then one of its voxels).")
    ] = "foreground",
    targets: Annotated[
        recipe.Targets, typer.Option(metavar="<kind>", help="Training targets: 'partial_volume' (class "
                                     "fractions of each model voxel) or 'nearest' (one label per voxel).")
    ] = "partial_volume",
    image_resampling: Annotated[
        ImageResampling, typer.Option(metavar="<method>", help="How the CT reaches the model grid: "
                                      "'bilinear' (sampled at each model voxel's centre) or 'box' (each "
                                      "model voxel's footprint averaged).")
    ] = "bilinear",
    mar: Annotated[
        TrainingMetalArtefactReduction, typer.Option(metavar="<method>", help="Metal artefact reduction of "
                                             "every CT before the model grid: 'none' or 'li' (the "
                                             "metal trace interpolated in each projection); the "
                                             "package asks inference for the same.")
    ] = "none",
    warmup_steps: Annotated[int, typer.Option(help="Linear LR warm-up steps.")] = 20,
    loss: Annotated[
        recipe.Loss, typer.Option(metavar="<name>", help="'dicece' (soft Dice + cross-entropy) or "
                               "'dicefocal' (soft Dice + softmax focal loss, gamma 2: voxels the "
                               "network already gets right count less).")
    ] = "dicece",
    class_weight: Annotated[
        list[str] | None, typer.Option(metavar="NAME=W", help="Loss weight of one class (both "
                                       "loss terms; repeat the option for more; every other class 1), "
                                       "e.g. obturator_externus=3.")
    ] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch.")] = 2,
    cache_workers: Annotated[
        int, typer.Option(help="Processes that render and cache the phantoms before the first step "
                          "(one core each).")
    ] = 1,
    seed: Annotated[int, typer.Option(help="Training RNG seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", parser=device_option)] = "auto",
    precision: Annotated[
        recipe.Precision, typer.Option(metavar="<mode>", help="auto (bf16 autocast where the CPU or GPU "
                                       "runs bf16 natively), fp32 or bf16.")
    ] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    check: Annotated[
        bool, typer.Option("--check", help="Dry run: read every case of --data as training does (files, "
                           "label values, grid), print voxels per class and missing classes; train "
                           "nothing, write nothing (exit 2 if a case would stop training).")
    ] = False,
) -> None:
    """Train a MONAI UNETR (paper preprocessing, Dice + cross-entropy or focal loss) and write a model
    package.

    The defaults are the recipe that trained the shipped demo model (seg/recipe.py): give
    --phantoms N (or --data DIR) and --out DIR. Check a site dataset first with --data DIR --check.
    """
    from seg.dataset import DatasetError
    from seg.train import InitFromError
    from seg.train import train as run_train

    case_source(data, phantoms)
    zr = z_range_option(z_range)
    if roi % 16:
        raise typer.BadParameter("--roi must be a multiple of the patch size 16")
    class_weights = _class_weights(class_weight or [])
    arch = {**recipe.DEMO_UNETR, "img_size": [roi] * 3, "feature_size": feature_size,
            "hidden_size": hidden_size, "mlp_dim": mlp_dim, "num_heads": num_heads}
    cfg = _train_config(
        checkpoint_dir=str(checkpoints),
        data=str(data) if data else None,
        phantoms=phantoms,
        seed_start=seed_start,
        val_phantoms=val_phantoms if data is None else 0,
        postop_share=postop_share,
        atrophy_kept_min=atrophy_kept_min,
        postop_weight=postop_weight,
        streak_prob=streak_prob,
        implant_crop_prob=implant_crop_prob,
        cache_workers=cache_workers,
        phantom_z_range_mm=zr,
        arch=arch,
        spacing_mm=spacing_option(spacing),
        image_resampling=image_resampling,
        metal_artefact_reduction=mar,
        batch_size=batch_size,
        steps=steps,
        max_minutes=max_minutes,
        lr=lr,
        val_every=val_every,
        threads=threads,
        dice_batch=dice_batch,
        decay_start=decay_start,
        crop=crop,
        targets=targets,
        warmup_steps=warmup_steps,
        name=name,
        version=version,
        demo=demo,
        seed=seed,
        device=device,
        precision=precision,
        init_from=str(init_from) if init_from else None,
        class_weights=class_weights,
        loss=loss,
        **({"out": str(out)} if out is not None else {}),
    )
    if check:
        _check_dataset(data, progress)
        return
    if out is None:
        raise typer.BadParameter("give the model package folder to write", param_hint="--out")
    _check_run_folders(cfg, resume)
    _show_progress()
    try:
        path = run_train(cfg, resume=resume, progress=progress)
    except DatasetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--data") from exc
    except InitFromError as exc:  # found before anything is cached
        raise typer.BadParameter(str(exc), param_hint="--init-from") from exc
    Console(stderr=True).print(f"model package written to {path}")


# TrainConfig fields whose option is not the field's name with dashes
_TRAIN_OPTIONS = {"checkpoint_dir": "--checkpoints", "metal_artefact_reduction": "--mar",
                  "spacing_mm": "--spacing", "phantom_z_range_mm": "--z-range",
                  "class_weights": "--class-weight"}


def _train_config(**settings: object) -> TrainConfig:
    """The run's TrainConfig; a value it refuses (a share above 1, a batch of 0, a negative learning
    rate) is a usage error that names the option, before anything is rendered or trained."""
    import pydantic

    from seg.train import TrainConfig, refused_settings

    try:
        return TrainConfig(**settings)
    except pydantic.ValidationError as exc:
        raise typer.BadParameter(refused_settings(exc, _TRAIN_OPTIONS)) from None


def _class_weights(items: list[str]) -> dict[str, float]:
    """``--class-weight NAME=W`` values as a mapping, checked as training checks it (known class
    names, positive finite weights), so a typo is a usage error before anything is rendered."""
    from seg.loss import loss_class_weights

    out: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            weight = float(value)  # also refuses an item without "=" (value is then "")
        except ValueError:
            raise typer.BadParameter(f"give NAME=W, e.g. obturator_externus=3 (got {item!r})",
                                     param_hint="--class-weight") from None
        if name.strip() in out:
            raise typer.BadParameter(f"{name.strip()} is given twice", param_hint="--class-weight")
        out[name.strip()] = weight
    try:
        loss_class_weights(out)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--class-weight") from exc
    return out


def _check_dataset(data: Path | None, progress: bool) -> None:
    """``train --check``: every case read by training's own functions (:mod:`seg.datacheck`), the
    report on stdout, each case's progress on stderr; exit 2 when a case would stop the run."""
    from seg.datacheck import CaseCheck, check_case, report
    from seg.dataset import CT_NAMES, LABEL_NAMES, DatasetError, scan_dataset

    if data is None:
        raise typer.BadParameter("--check checks a site dataset: give --data DIR", param_hint="--check")
    try:
        found = scan_dataset(data)
    except DatasetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--data") from exc
    if not found.cases and not found.incomplete:
        raise typer.BadParameter(f"no case folders under {data}", param_hint="--data")
    names = {"CT": ", ".join(CT_NAMES), "label map": ", ".join(LABEL_NAMES)}
    # a folder without a CT or a label map is one bad case among the others, not the end of the check
    checks = [CaseCheck(name, problem=f"no {what} (one of {names[what]})") for name, what in found.incomplete]
    for n, case in enumerate(found.cases, start=1):
        if progress:
            typer.echo(f"checking case {n}/{len(found.cases)}: {case.case}", err=True)
        checks.append(check_case(case))
    typer.echo(report(sorted(checks, key=lambda c: c.case), found.table))
    if any(c.problem for c in checks):
        raise typer.Exit(2)


def _check_run_folders(cfg: TrainConfig, resume: bool) -> None:
    """What would otherwise fail after the dataset is cached, or silently lose work: a package
    exported over the one it starts from, a --resume with nothing to resume or another network, a
    new run over an earlier run's checkpoints (a package to start from that does not fit is found by
    the run itself, before it caches anything)."""
    ckdir = Path(cfg.checkpoint_dir)
    last = ckdir / "last.pt"
    if cfg.init_from and Path(cfg.init_from).resolve() == Path(cfg.out).resolve():
        raise typer.BadParameter(f"{cfg.out} is the package --init-from starts from: export to a new "
                                 "folder, evaluate it, then point the node at it", param_hint="--out")
    if resume and not last.is_file():
        raise typer.BadParameter(f"no checkpoint to resume at {last}: leave out --resume to start a new "
                                 "run", param_hint="--resume")
    if not resume and last.is_file():
        raise typer.BadParameter(f"{ckdir} holds a run already ({last.name}): --resume continues it; a new "
                                 "run needs its own --checkpoints folder", param_hint="--checkpoints")
    earlier = ckdir / "config.json"
    if resume and earlier.is_file():
        had = json.loads(earlier.read_text())
        differ = [k for k in ("arch", "spacing_mm", "targets") if had.get(k) != json.loads(
            json.dumps(getattr(cfg, k), default=list))]
        if differ:
            started = ", ".join(f"{k} {had.get(k)}" for k in differ)
            raise typer.BadParameter(f"the run in {ckdir} was started with other {', '.join(differ)}: "
                                     f"{started}", param_hint="--resume")
    if cfg.arch["hidden_size"] % cfg.arch["num_heads"]:
        raise typer.BadParameter(f"--hidden-size {cfg.arch['hidden_size']} is not divisible by "
                                 f"--num-heads {cfg.arch['num_heads']}", param_hint="--num-heads")


def _show_progress() -> None:
    """Long commands (train, evaluate) report each step's progress on stderr as timestamped lines.

    The JPEG 2000 encoder (pylibjpeg-openjpeg) logs one INFO line per tile it writes: hundreds per
    compressed held-out phantom, which buried the per-case lines; it speaks at WARNING and above.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("openjpeg").setLevel(logging.WARNING)


def evaluate(
    model: Annotated[Path | None, typer.Option("--model", help="Model package (default: demo).")] = None,
    phantoms: Annotated[int, typer.Option("--phantoms", help="Evaluate on N held-out phantoms.")] = 0,
    seed_start: Annotated[int, typer.Option("--seed-start", help="First held-out phantom seed.")] = 5000,
    data: Annotated[Path | None, typer.Option("--data", help="Dataset folder (as for train).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write evaluation.json and evaluation.csv here.")
    ] = None,
    z_range: Annotated[str | None, typer.Option(help="Phantom z range mm 'lo,hi' (small phantoms).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", parser=device_option)] = "auto",
    network_only: Annotated[
        bool, typer.Option("--network-only", help="Skip the package's HU refinement of the label edges.")
    ] = False,
) -> None:
    """Per-class Dice, HD95 and volume error of a model on held-out labelled CTs."""
    from seg.dataset import DatasetError
    from seg.evaluate import evaluate_model, format_table, write_evaluation
    from seg.model import load_model
    from seg.package import ModelPackageError

    case_source(data, phantoms)
    zr = z_range_option(z_range)
    try:
        pkg = load_model(model, device=device)
    except ModelPackageError as e:
        raise typer.BadParameter(str(e), param_hint="--model") from e
    _show_progress()
    try:
        result = evaluate_model(pkg, phantoms=phantoms, seed_start=seed_start, data=data, z_range_mm=zr,
                                hu_refinement=not network_only)
    except DatasetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--data") from exc
    Console().print(format_table(result))
    if out is not None:
        write_evaluation(result, out)
        Console(stderr=True).print(f"written {out / 'evaluation.json'}")
    else:
        Console(stderr=True, highlight=False).print(_unsaved_summary(result), soft_wrap=True)


def _unsaved_summary(result: Evaluation) -> str:
    """The last line without --out: the headline figure in words, and how to keep the rest."""
    dice = "-" if result.mean_dice_muscles is None else f"{result.mean_dice_muscles:.4f}"
    return f"mean muscle Dice {dice} ({result.cases} cases); --out DIR saves evaluation.json and .csv"


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the main app."""
    for name, command in (("segment", segment), ("train", train), ("evaluate", evaluate)):
        app.command(name)(command)
