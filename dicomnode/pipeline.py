"""One job, start to finish: series files in, DICOM outputs (to send) and measurements out.

The worker calls :func:`run_pipeline`; everything it needs from ``seg`` and ``reporting`` is called
from here and nowhere else, so the queue engine can change without touching the science.

Flow: load the series as a :class:`~seg.volume.Volume` → segment with the configured model →
(:func:`report`) measure volumes → SEG, measurement SR and readable summary → record the result for
pairing → a follow-up SR for every comparison the new result creates: in this study when it is the
later one, and in the later study when this one arrived late as its baseline (or previous study),
so that a change is reported whichever study the PACS sent first. Results live in
``storage_dir/results/<SeriesInstanceUID>/`` so that pairing can reference earlier outputs after a
restart; file names are the outputs' deterministic SOP Instance UIDs, so a re-run overwrites.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.config import Settings
from dicomnode.registry import height_for

log = logging.getLogger(__name__)


class SeriesRejected(Exception):
    """The series is not something this node measures; the message says why (shown to users)."""


def _no_stored_series(series_instance_uid: str) -> list[Path]:
    return []


@dataclass
class JobInput:
    job_id: int
    series_instance_uid: str
    files: list[Path]  # every stored instance of the series
    work_dir: Path  # private folder for this job's intermediate and output files
    # the stored instances of another series (a later study this one turns out to be the baseline of)
    series_files: Callable[[str], list[Path]] = _no_stored_series


@dataclass
class JobOutput:
    outputs: list[Path] = field(default_factory=list)  # DICOM files to send to the PACS
    volumes_json: Path | None = None
    message: str = ""


_model_lock = threading.Lock()
_model_cache: dict[tuple[str, str], Any] = {}


def load_configured_model(settings: Settings) -> Any:
    """The configured model package (the shipped demo model when none is set), loaded once per process."""
    from seg.model import load_model

    key = (str(settings.model_path or ""), settings.worker.device)
    with _model_lock:
        if key not in _model_cache:
            _model_cache[key] = load_model(settings.model_path, device=settings.worker.device)
        return _model_cache[key]


def results_dir(settings: Settings, series_instance_uid: str) -> Path:
    return Path(settings.storage_dir) / "results" / series_instance_uid


def patient_height(settings: Settings, meta: dict) -> tuple[float | None, str | None]:
    """Height by trust: the clinical registry, then DICOM PatientSize (plausibility: :mod:`seg.height`)."""
    return height_for(settings, meta)


def _save(ds: Any, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return path


def run_pipeline(job: JobInput, settings: Settings) -> JobOutput:
    """Measure one accepted series and build every DICOM object to send back."""
    from seg.infer import segment
    from seg.io import load_dicom_series

    try:
        ct = load_dicom_series(sorted(job.files))
    except ValueError as exc:  # geometry the loader cannot place in space
        raise SeriesRejected(str(exc)) from exc
    if str(ct.meta.get("Modality", "CT")) != "CT":
        raise SeriesRejected(f"modality {ct.meta.get('Modality')} is not CT")

    model = load_configured_model(settings)
    model_info = dict(model.info)
    log.info("job %s: segmenting %s voxels with %s %s", job.job_id, "×".join(map(str, ct.shape)),
             model_info.get("name"), model_info.get("version"))
    labels = segment(ct, model)
    return report(job, settings, ct, labels, model_info)


@dataclass
class BuiltOutputs:
    datasets: list[Any]  # SEG, measurement SR and (when configured) the summary, in sending order
    changes: list[dict]  # comparisons with earlier studies that pairing found (baseline first)


def _no_pairing(seg_ds: Any, sr_ds: Any) -> list[dict]:
    return []


def build_outputs(settings: Settings, ct: Any, labels: Any, record: dict, model_info: dict,
                  pair: Callable[[Any, Any], list[dict]] = _no_pairing) -> BuiltOutputs:
    """The SEG, SR and summary of one series, built once here for the node and ``segment --dicom``.

    Why one function: offline outputs must equal what the node sends, UIDs included. ``pair`` records
    the result for pairing (it needs the SEG and SR UIDs) and returns the changes the summary plots.
    """
    from reporting.seg import build_seg
    from reporting.sr import build_measurement_sr
    from reporting.summary import build_summary

    seg_ds = build_seg(ct, labels, record, model_info, seg_type=settings.output.seg_type,
                       compression=settings.output.labelmap_compression)
    sr_ds = build_measurement_sr(ct, seg_ds, record, model_info)
    changes = pair(seg_ds, sr_ds)
    datasets = [seg_ds, sr_ds]
    if settings.output.summary:
        baseline_change = changes[0] if changes else None
        datasets.append(build_summary(ct, record, model_info, change=baseline_change, labels=labels))
    return BuiltOutputs(datasets=datasets, changes=changes)


def report(job: JobInput, settings: Settings, ct: Any, labels: Any, model_info: dict) -> JobOutput:
    """Everything after segmentation: volumes, SEG, SR, summary, pairing and follow-up SRs."""
    from seg.io import save_nifti
    from seg.measure import measure_volumes, write_volumes

    height_m, height_source = patient_height(settings, ct.meta)
    record = measure_volumes(labels, ct, height_m=height_m, height_source=height_source, model=model_info)
    out_dir = results_dir(settings, job.series_instance_uid)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_volumes(record, out_dir)
    save_nifti(labels, out_dir / "labels.nii.gz")

    dicom_dir = out_dir / "outputs"

    saved: list[Path] = []

    def pair(seg_ds: Any, sr_ds: Any) -> list[dict]:
        saved.extend([_save(seg_ds, dicom_dir), _save(sr_ds, dicom_dir)])  # on disk before pairing cites them
        if not settings.pairing.enabled:
            return []
        return _record_for_pairing(settings, ct, out_dir, seg_ds, sr_ds)

    built = build_outputs(settings, ct, labels, record, model_info, pair=pair)
    outputs = saved + [_save(ds, dicom_dir) for ds in built.datasets[len(saved):]]
    changes = built.changes
    late: list[Path] = []
    if settings.output.followup_sr:
        outputs += [_followup_sr(settings, ct, change) for change in changes]
        if settings.pairing.enabled:
            late = later_followups(settings, job)
            outputs += late
    message = f"{len(record['structures'])} structures measured; {len(outputs)} objects to send"
    if changes:
        message += f"; compared with {len(changes)} earlier stud{'y' if len(changes) == 1 else 'ies'}"
    if late:
        message += f"; {len(late)} follow-up report(s) for later studies"
    return JobOutput(outputs=outputs, volumes_json=out_dir / "volumes.json", message=message)


def _followup_sr(settings: Settings, later: Any, change: dict) -> Path:
    """Build and save the follow-up SR of ``change`` in the later study's results (``later``: its CT).

    Its UIDs derive from both studies' content (:mod:`reporting.uids`), so building it again, from
    either study's job, gives the same object and the PACS keeps one copy.
    """
    from reporting.followup_sr import build_followup_sr

    out_dir = results_dir(settings, change["followup"]["series_instance_uid"])
    path = _save(build_followup_sr(later, change, _prior_outputs(settings, change)), out_dir / "outputs")
    baseline_uid = change["baseline"]["series_instance_uid"]
    (out_dir / f"change-{baseline_uid}.json").write_text(json.dumps(change, indent=2))
    return path


def later_followups(settings: Settings, job: JobInput) -> list[Path]:
    """The follow-up SRs of later studies that this series now serves as the earlier study for.

    Pairing stores these comparisons when a baseline arrives after its follow-up; without this
    nothing would report them. The later study's CT comes from the store (its own job has finished);
    when its instances are gone the change stays recorded and the report is skipped, with a warning.
    """
    from dicomnode.pairing import changes_for_earlier_series
    from seg.io import load_dicom_series

    paths = []
    for change in changes_for_earlier_series(settings, job.series_instance_uid):
        later_uid = str(change["followup"]["series_instance_uid"])
        files = job.series_files(later_uid)
        try:
            later = load_dicom_series(sorted(files))
        except ValueError as exc:
            log.warning("job %s: no follow-up SR for later series %s: %s", job.job_id, later_uid,
                        exc if files else "its instances are no longer stored")
            continue
        paths.append(_followup_sr(settings, later, change))
    return paths


def _record_for_pairing(settings: Settings, ct: Any, out_dir: Path, seg_ds: Any, sr_ds: Any) -> list[dict]:
    from dicomnode.pairing import ResultRecord, record_result

    meta = ct.meta
    size = meta.get("PatientSize")
    result = ResultRecord(
        patient_id=str(meta.get("PatientID", "")),
        issuer_of_patient_id=str(meta.get("IssuerOfPatientID", "") or ""),
        patient_sex=str(meta.get("PatientSex", "") or ""),
        patient_size_m=float(size) if size not in (None, "") else None,
        study_instance_uid=str(meta["StudyInstanceUID"]),
        study_date=str(meta.get("StudyDate", "") or ""),
        study_time=str(meta.get("StudyTime", "") or ""),
        series_instance_uid=str(meta["SeriesInstanceUID"]),
        volumes_json=out_dir / "volumes.json",
        seg_sop_instance_uid=str(seg_ds.SOPInstanceUID),
        sr_sop_instance_uid=str(sr_ds.SOPInstanceUID),
        result_dir=out_dir,
    )
    return record_result(settings, result)


def _prior_outputs(settings: Settings, change: dict) -> list[Any]:
    """The baseline's SEG and SR (headers only), the evidence a follow-up SR cites."""
    import pydicom

    folder = results_dir(settings, change["baseline"]["series_instance_uid"]) / "outputs"
    wanted = {change["baseline"].get("seg_sop_instance_uid"), change["baseline"].get("sr_sop_instance_uid")}
    found = []
    for uid in sorted(u for u in wanted if u):
        path = folder / f"{uid}.dcm"
        if path.is_file():
            found.append(pydicom.dcmread(path, stop_before_pixels=True))
    return found
