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

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.clinical.registry import facts_for
from dicomnode.config import Settings
from dicomnode.processing.forkwrite import BackgroundWrite
from dicomnode.processing.phases import PhaseLog
from seg.records import ChangeRecord, ClinicalTimePoint, ModelInfo, VolumeRecord

log = logging.getLogger(__name__)


class SeriesRejected(Exception):
    """The series is not something this node measures; the message says why (shown to users)."""


def _no_stored_series(series_instance_uid: str) -> list[Path]:
    return []


def _no_early_output(path: Path) -> None:
    return None


@dataclass
class JobInput:
    job_id: int  # 0: `segment --record` (dicomnode.commands.segmentation.record_case), no job row
    series_instance_uid: str
    files: list[Path]  # every stored instance of the series
    work_dir: Path  # private folder for this job's intermediate and output files
    # the CT files of another series (a baseline's key images, a later study this one turns out to be
    # the baseline of): dicomnode.processing.sources.SeriesLookup, on the node and offline alike
    series_files: Callable[[str], list[Path]] = _no_stored_series
    # outputs an earlier attempt of this job put in the outbox (perhaps sent): never written again
    outputs_in_outbox: frozenset[Path] = frozenset()
    # told of each output once it is complete on disk, before the pipeline returns: the node's pipeline
    # process hands it to the sender at once (:mod:`dicomnode.processing.isolation`)
    output_ready: Callable[[Path], None] = _no_early_output


@dataclass
class JobOutput:
    outputs: list[Path] = field(default_factory=list)  # DICOM files to send to the PACS
    volumes_json: Path | None = None
    message: str = ""


_model_lock = threading.Lock()
_model_cache: dict[tuple[Any, ...], Any] = {}


def _package_stamp(model_path: Any) -> tuple[tuple[str, int, int], ...]:
    """Name, mtime and size of the model package's files: a package replaced on disk is loaded again."""
    if not model_path:
        return ()
    folder = Path(model_path)
    try:
        files = [folder, *sorted(folder.iterdir())] if folder.is_dir() else [folder]
        return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    except OSError:
        return ()


def load_configured_model(settings: Settings) -> Any:
    """The configured model package (the shipped demo model when none is set), loaded once per process.

    The worker's pipeline process stays up between jobs, so the cache is keyed by the package's files
    too: new weights copied over the configured package are used from the next job on.
    """
    from seg.model import load_model
    from seg.runtime import prepare

    key = (str(settings.model_path or ""), settings.worker.device, settings.worker.runtime,
           _package_stamp(settings.model_path))
    with _model_lock:
        if key not in _model_cache:
            _model_cache.clear()  # one model resident at a time
            pkg = load_model(settings.model_path, device=settings.worker.device)
            _model_cache[key] = prepare(pkg, settings.worker.runtime)
        return _model_cache[key]


def warm_up(settings: Settings) -> None:
    """Before the first job (the worker's pipeline process calls it): imports, tables and the model load.

    Why: they take seconds that a job would otherwise wait for (:mod:`dicomnode.processing.isolation`);
    the children a job forks (:mod:`dicomnode.processing.forkwrite`) inherit them too.
    """
    import matplotlib.backends.backend_agg  # noqa: F401 - imported for their import time
    import matplotlib.figure  # noqa: F401
    import nibabel  # noqa: F401

    import reporting.followup_sr  # noqa: F401
    import reporting.seg  # noqa: F401
    import reporting.sr  # noqa: F401
    import reporting.summary  # noqa: F401
    import seg.infer  # noqa: F401
    import seg.io  # noqa: F401
    import seg.measure  # noqa: F401

    _load_highdicom_tables()
    load_configured_model(settings)
    _freeze_warm_objects()


def _freeze_warm_objects() -> None:
    """Keep what the warm-up loaded (modules, standard tables, the model) out of the garbage
    collector's reach for the life of the process.

    Why: a job forks children (:mod:`dicomnode.processing.forkwrite`) that share the process's pages
    copy-on-write, and a full collection writes to every object it tracks: after a fork, the next one
    in the parent (or a child) copies nearly the whole heap, page by page (a 400-slice SEG's header,
    built just after the summary child is forked, took twice as long). These objects live as long as
    the process anyway; a job's own objects are collected as before.
    """
    import gc

    gc.collect()
    gc.freeze()


def _load_highdicom_tables() -> None:
    """highdicom's tables of the standard (IODs, modules, attributes: JSON, about 0.5 s to parse), which
    it loads at the first object it builds and caches: loaded here, the first job's SEG does not wait
    for them, nor do the children that build its summary (they inherit them). Private functions
    (guarded in tests/test_library_guard.py; the upstream fix would be a public preload): on a
    highdicom without them the first object loads the tables, as before."""
    try:
        from highdicom import _standard_utils as tables

        tables.get_sop_class_iod_map()
        tables.get_iod_module_map()
        tables.get_module_attribute_map()
    except (ImportError, AttributeError) as exc:  # pragma: no cover - another highdicom
        log.debug("highdicom tables not preloaded: %s", exc)


def results_root(storage_dir: Path | str) -> Path:
    """The node's results folder, one sub-folder per measured series (:func:`results_dir`): the
    layout is said here alone, for the node's jobs, ``segment --record``, the CT lookup of another
    series (:mod:`dicomnode.processing.sources`) and the demo."""
    return Path(storage_dir) / "results"


def results_dir(settings: Settings, series_instance_uid: str) -> Path:
    """``results/<SeriesInstanceUID>/``: the series' measurements and outputs."""
    return results_root(settings.storage_dir) / series_instance_uid


def _save(ds: Any, folder: Path) -> Path:
    return _save_as(ds, folder / f"{ds.SOPInstanceUID}.dcm")


def _save_as(ds: Any, path: Path) -> Path:
    """Write ``ds`` at ``path`` whole or not at all (a temporary name, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return path


# set when an object is built, not by its content: left out when a rebuild is compared with a file sent
# (the Secondary Capture's own capture time too: the summary page is handed on before its job ends)
BUILD_TIME_KEYWORDS = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
                       "SeriesDate", "SeriesTime", "ContributionDateTime", "DateOfSecondaryCapture",
                       "TimeOfSecondaryCapture")


def _without_build_times(ds: Any) -> Any:
    """``ds`` with :data:`BUILD_TIME_KEYWORDS` removed at every depth (in place; returned)."""
    for keyword in BUILD_TIME_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _without_build_times(item)
    return ds


class OutputChanged(RuntimeError):
    """A re-run built other content under a UID an earlier attempt already handed to the sender."""


def _check_same_content(ds: Any, handed_on: Path, scratch: Path) -> None:
    """Raise :class:`OutputChanged` unless ``ds`` equals the file at ``handed_on`` but for build times.

    Why: that file may be in the PACS already, and a UID must never name two contents. A re-run of the
    same series with the same model gives the same objects, so this holds unless inference differs.
    """
    import shutil

    try:
        _check_same_file(_save(ds, scratch), handed_on)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_same_file(fresh: Path, handed_on: Path) -> None:
    """:func:`_check_same_content` for an output already written (at ``fresh``)."""
    import pydicom

    new, earlier = pydicom.dcmread(fresh), pydicom.dcmread(handed_on)
    if _without_build_times(new) != _without_build_times(earlier):
        raise OutputChanged(f"the {new.get('Modality', 'output')} {new.SOPInstanceUID} was built again with"
                            " other content than the one an earlier attempt handed to the sender")


def run_pipeline(job: JobInput, settings: Settings) -> JobOutput:
    """Measure one accepted series and build every DICOM object to send back."""
    from dicomnode.logs import error_text
    from seg.infer import segment
    from seg.io import SeriesGeometryError, load_dicom_series

    phases = PhaseLog(job.work_dir)
    try:
        with phases.phase("dicom load"):
            ct = load_dicom_series(sorted(job.files))
    except SeriesGeometryError as exc:  # geometry the loader cannot place in space: our words
        raise SeriesRejected(str(exc)) from exc
    except ValueError as exc:  # a header value a library cannot read: its text may quote the value
        log.debug("job %s: the series cannot be read", job.job_id, exc_info=True)
        raise SeriesRejected(f"a header value cannot be read: {error_text(exc)}") from exc
    if (ct.header.modality or "CT") != "CT":
        raise SeriesRejected(f"modality {ct.header.modality} is not CT")

    with phases.phase("model load"):  # nothing left to do when the process was warmed up
        model = load_configured_model(settings)
    model_info = model.info
    log.info("job %s: segmenting %s voxels with %s %s", job.job_id, "×".join(map(str, ct.shape)),
             model_info.name, model_info.version)
    with phases.phase("inference"):
        labels = segment(ct, model)
    return report(job, settings, ct, labels, model_info)


@dataclass
class BuiltOutputs:
    datasets: list[Any]  # SEG, measurement SR and (when configured) the summary, in sending order
    changes: list[ChangeRecord]  # comparisons with earlier studies that pairing found (baseline first)


def _no_pairing(seg_ds: Any, sr_ds: Any) -> list[ChangeRecord]:
    return []


def _no_baseline(change: ChangeRecord) -> tuple[Any, Any] | None:
    return None


def _ignore(ds: Any) -> None:
    return None


def _not_written(change: ChangeRecord | None) -> Path | None:
    return None


def summary_page(ct: Any, labels: Any, record: VolumeRecord, model_info: ModelInfo,
                 change: ChangeRecord | None = None, baseline: tuple[Any, Any] | None = None,
                 facts: ClinicalTimePoint = ClinicalTimePoint()) -> Any:
    """The summary page of a series (with ``change``, and ``baseline``'s key images, for a follow-up;
    ``facts``: the registry's, :meth:`~dicomnode.clinical.registry.Resolved.time_point`; a page
    without a comparison says which hip broke, how, and when the study was taken relative to the
    surgery too): one call for :func:`build_outputs` and the node's :class:`SummaryDraft`, so the two
    are one page."""
    from reporting.summary import build_summary

    return build_summary(ct, record, model_info, change=change, labels=labels, baseline=baseline,
                         facts=facts)


SRBeside = Callable[[Callable[[], Any]], Callable[[], Any]]


def build_outputs(settings: Settings, ct: Any, labels: Any, record: VolumeRecord, model_info: ModelInfo,
                  pair: Callable[[Any, Any], list[ChangeRecord]] = _no_pairing,
                  baseline: Callable[[ChangeRecord], tuple[Any, Any] | None] = _no_baseline,
                  phases: PhaseLog | None = None, seg_built: Callable[[Any], None] = _ignore,
                  summary_written: Callable[[ChangeRecord | None], Path | None] = _not_written,
                  sr_beside: SRBeside | None = None,
                  facts: ClinicalTimePoint = ClinicalTimePoint()) -> BuiltOutputs:
    """The SEG, SR and summary of one series, built once here for the node and ``segment --dicom``.

    Why one function: offline outputs must equal what the node sends, UIDs included. ``pair`` records
    the result for pairing (it needs the SEG and SR UIDs) and returns the changes the summary plots;
    ``baseline`` gives the earlier study's CT and label map of the first change (None when they are
    no longer stored), so that the summary's key images show pre and post side by side.
    ``seg_built`` gets the SEG as soon as it exists (the node writes it and hands it on).
    ``sr_beside`` starts the SR's build (the function it gets) elsewhere and returns a function that
    waits for the SR: the node builds it in a forked child while the SEG's frames are encoded, from
    the SEG's header and frame index, all it needs of the SEG (:class:`reporting.seg.BuiltSeg`);
    without it the SR is built here after the SEG. ``facts``: the registry's, read once by the job,
    for the SR and the page.
    ``summary_written`` is asked first for the summary
    with the comparison pairing found (None: none): the file when it is written already (the node's
    :class:`SummaryDraft`; it is then not in ``datasets``), else None and the summary is built here.
    """
    from dicomnode.logs import load_pseudonym_key
    from reporting.seg import build_seg_frames
    from reporting.sr import build_measurement_sr
    from reporting.uids import use_tracking_key

    use_tracking_key(load_pseudonym_key(settings.storage_dir))  # the node's own, as offline
    phases = phases or PhaseLog(None)
    sr_done: Callable[[], Any] | None = None
    with phases.phase("SEG encoding"):
        built_seg = build_seg_frames(ct, labels, record, model_info, seg_type=settings.output.seg_type,
                                     compression=settings.output.labelmap_compression,
                                     defer_frames=sr_beside is not None)
        if sr_beside is not None:
            sr_done = sr_beside(lambda: build_measurement_sr(ct, built_seg.header, record, model_info,
                                                             frames=built_seg.frames, facts=facts))
        seg_ds = built_seg.dataset  # the frames encoded (while the SR is built beside)
    seg_built(seg_ds)
    with phases.phase("SR encoding"):  # what the SEG's frames hold, known from its build: no read-back
        if sr_done is None:
            sr_ds = build_measurement_sr(ct, seg_ds, record, model_info, frames=built_seg.frames,
                                         facts=facts)
        else:  # what is left of it: the wait for the build beside
            sr_ds = sr_done()
    changes = pair(seg_ds, sr_ds)
    datasets = [seg_ds, sr_ds]
    if settings.output.summary:
        baseline_change = changes[0] if changes else None
        if summary_written(baseline_change) is None:
            pre = baseline(baseline_change) if baseline_change is not None else None
            with phases.phase("summary encoding"):
                datasets.append(summary_page(ct, labels, record, model_info, baseline_change, pre,
                                             facts))
    return BuiltOutputs(datasets=datasets, changes=changes)


class SummaryDraft:
    """The summary page without a comparison, built by a forked child while the SEG and SR are built.

    Why a draft: the page shows the comparison pairing finds, and pairing runs once the SEG and SR are
    on disk (the pairing record cites them), but most studies (every patient's first) have none. So
    the page without one is built at once on the core that is idle after inference
    (:mod:`dicomnode.processing.forkwrite`), into a folder beside the outputs; :meth:`take` waits for
    it when pairing found no comparison, :meth:`drop` discards it otherwise (the page is then built
    after pairing as before). Either way the page is :func:`summary_page`'s: the same file.
    """

    def __init__(self, folder: Path, build: Callable[[], Any], phases: PhaseLog) -> None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)  # what a crashed attempt left
        self.folder = folder
        path = folder / "summary.dcm"

        def make() -> Path:
            with phases.phase("summary encoding (background)"):  # in the child, off the critical path
                return _save_as(build(), path)

        self._write = BackgroundWrite(make, path)

    def take(self) -> Path:
        """The drafted file, once written (by the child; here when the child failed)."""
        return self._write.wait()

    def drop(self) -> None:
        """Stop the child if it still runs and remove the draft (taken or not)."""
        import shutil

        self._write.cancel()
        shutil.rmtree(self.folder, ignore_errors=True)


def report(job: JobInput, settings: Settings, ct: Any, labels: Any, model_info: ModelInfo) -> JobOutput:
    """Everything after segmentation: volumes, SEG, SR, summary, pairing and follow-up SRs."""
    from seg.measure import measure_volumes, write_volumes

    phases = PhaseLog(job.work_dir)
    with phases.phase("measure"):
        facts = facts_for(settings, ct.header)
        record = measure_volumes(labels, ct, height_m=facts.height_m, height_source=facts.height_source,
                                 model=model_info)
    out_dir = results_dir(settings, job.series_instance_uid)
    out_dir.mkdir(parents=True, exist_ok=True)
    clinical = facts.time_point(ct.header.study_date, record.qa)  # what the SR and the page show of it
    draft = SummaryDraft(out_dir / "summary-draft",
                         lambda: summary_page(ct, labels, record, model_info, facts=clinical),
                         phases) if settings.output.summary else None
    label_file = out_dir / "labels.nii.gz"  # a later study's summary shows it as "pre"
    labels_saved: BackgroundWrite | None = None
    try:
        with phases.phase("results write"):
            write_volumes(record, out_dir)
            # compressed by a child while the SEG is built; on disk before pairing records the result
            labels_saved = BackgroundWrite(lambda: _save_labels(labels, label_file), label_file)
        return _report_outputs(job, settings, ct, labels, model_info, record, out_dir, phases, draft,
                               labels_saved.wait, clinical)
    finally:
        if labels_saved is not None:
            labels_saved.wait()  # complete either way: a later job may read it
        if draft is not None:
            draft.drop()


def _save_labels(labels: Any, path: Path) -> Path:
    """The label map as NIfTI at ``path``, whole or not at all (a temporary name, then a rename)."""
    from seg.io import save_nifti

    tmp = path.with_name(f".{path.name}")  # the same suffix: nibabel compresses by it
    save_nifti(labels, tmp)
    tmp.replace(path)
    return path


class _OutputHandOff:
    """Where a job's DICOM outputs go as they are built: written into ``outputs/`` and handed to the
    sender one by one (the SEG at once, the SR from its child after the SEG, the drafted page), or,
    when an earlier attempt of the job handed an object on already, checked to equal that file.

    Why a class: the builders call back into it at different moments (:func:`build_outputs`), and
    each call adds to the same list of files handed on and the same pending background writes.
    """

    def __init__(self, job: JobInput, dicom_dir: Path, phases: PhaseLog) -> None:
        self.job, self.dicom_dir, self.phases = job, dicom_dir, phases
        self.saved: list[Path] = []
        self.sr_writes: list[BackgroundWrite] = []

    def handed_on_before(self, ds: Any) -> Path | None:
        """The file of ``ds`` when an earlier attempt handed it to the sender: it stays as it is, and
        this build must equal it (:func:`_check_same_content`); None when it is to be written."""
        path = self.dicom_dir / f"{ds.SOPInstanceUID}.dcm"
        if path not in self.job.outputs_in_outbox or not path.is_file():
            return None
        _check_same_content(ds, path, self.job.work_dir / f"rebuilt-{ds.SOPInstanceUID}")
        return path

    def seg_built(self, seg_ds: Any) -> None:
        """The SEG is written and handed to the sender at once, while the SR child finishes."""
        with self.phases.phase("outputs write"):
            path = self.handed_on_before(seg_ds)
            if path is None:
                path = _save(seg_ds, self.dicom_dir)
                self.job.output_ready(path)
        self.saved.append(path)

    def sr_beside(self, uid: str, build: Callable[[], Any]) -> Callable[[], Any]:
        """The SR (SOP Instance UID ``uid``, known beforehand) built and written, or checked against
        the file handed on before, by a forked child while the SEG's frames are encoded here; the
        returned wait hands it to the sender, after the SEG (an SR is never sent beside a SEG that
        failed its check). The child's failure: built here."""
        path = self.dicom_dir / f"{uid}.dcm"
        kept = path in self.job.outputs_in_outbox and path.is_file()

        def make() -> Path:
            with self.phases.phase("SR encoding (background)"):  # in the child, beside the SEG's frames
                sr = build()
                if str(sr.SOPInstanceUID) != uid:
                    raise RuntimeError(f"SR built as {sr.SOPInstanceUID}, named {uid} beforehand")
                if kept:
                    _check_same_content(sr, path, self.job.work_dir / f"rebuilt-{uid}")
                else:
                    _save(sr, self.dicom_dir)
            return path

        self.sr_writes.append(BackgroundWrite(make, path))

        def done() -> Any:
            import pydicom

            written = self.sr_writes.pop().wait()
            if not kept:
                self.job.output_ready(written)
            self.saved.append(written)
            return pydicom.dcmread(written)  # read lazily: the content stays raw

        return done

    def summary_written(self, draft: SummaryDraft | None, change: ChangeRecord | None) -> Path | None:
        """The draft, among the outputs and handed on, when it is the page wanted (no comparison)."""
        if draft is None or change is not None:
            return None
        import pydicom

        with self.phases.phase("summary encoding"):  # what is left of it: the wait for the child
            drafted = draft.take()
            path = self.dicom_dir / f"{pydicom.dcmread(drafted, stop_before_pixels=True).SOPInstanceUID}.dcm"
            if path in self.job.outputs_in_outbox and path.is_file():  # handed on before: kept as it is
                _check_same_file(drafted, path)
            else:
                drafted.replace(path)
                self.job.output_ready(path)
        self.saved.append(path)
        return path

    def cancel_pending(self) -> None:
        """Background writes not waited for: the job failed before the SR was wanted."""
        for write in self.sr_writes:
            write.cancel()


def _report_outputs(job: JobInput, settings: Settings, ct: Any, labels: Any, model_info: ModelInfo,
                    record: VolumeRecord, out_dir: Path, phases: PhaseLog, draft: SummaryDraft | None,
                    results_saved: Callable[[], Any], facts: ClinicalTimePoint) -> JobOutput:
    """:func:`report` from the measured volumes on: the DICOM outputs, pairing and follow-up SRs
    (``results_saved`` returns once the results folder is complete: before pairing records it)."""
    from reporting.sr import measurement_sr_uid

    dicom_dir = out_dir / "outputs"
    hand_off = _OutputHandOff(job, dicom_dir, phases)

    def pair(seg_ds: Any, sr_ds: Any) -> list[ChangeRecord]:
        with phases.phase("outputs write"):
            results_saved()  # the SEG and SR on disk before pairing cites them, and the label map
        if not settings.pairing.enabled:
            return []
        with phases.phase("pairing"):
            return _record_for_pairing(settings, ct, out_dir, seg_ds, sr_ds)

    def baseline(change: ChangeRecord) -> tuple[Any, Any] | None:
        with phases.phase("baseline load"):
            return stored_study(settings, job, str(change.baseline.series_instance_uid))

    try:
        built = build_outputs(
            settings, ct, labels, record, model_info, pair=pair, baseline=baseline, phases=phases,
            seg_built=hand_off.seg_built,
            summary_written=lambda change: hand_off.summary_written(draft, change),
            sr_beside=lambda build: hand_off.sr_beside(measurement_sr_uid(ct, record, model_info, facts),
                                                       build),
            facts=facts)
    finally:
        hand_off.cancel_pending()
    with phases.phase("outputs write"):
        outputs = hand_off.saved + [_save(ds, dicom_dir) for ds in built.datasets[2:]]  # a summary built here
    with phases.phase("follow-up reports"):
        late = _followup_reports(settings, job, ct, labels, built, model_info)
    outputs += late.change_srs + late.later_studies
    return JobOutput(outputs=outputs, volumes_json=out_dir / "volumes.json",
                     message=_job_message(record, outputs, built.changes, late.later_studies))


@dataclass(frozen=True)
class _FollowupReports:
    change_srs: list[Path]  # this study's change SRs, one per comparison
    later_studies: list[Path]  # change SRs and pages of later studies that compare with this one


def _followup_reports(settings: Settings, job: JobInput, ct: Any, labels: Any, built: Any,
                      model_info: ModelInfo) -> _FollowupReports:
    """The change SRs of this study's comparisons, and the reports of later studies measured before
    this one arrived (they compare with it now)."""
    change_srs: list[Path] = []
    if settings.output.followup_sr:
        seg_ds = built.datasets[0]  # this study's SEG: the change SR outlines each muscle from it
        change_srs = [_followup_sr(settings, ct, change, seg_ds, model_info) for change in built.changes]
    later: list[Path] = []
    if settings.pairing.enabled and (settings.output.followup_sr or settings.output.summary):
        later = later_followups(settings, job, earlier=(ct, labels))
    return _FollowupReports(change_srs, later)


def _job_message(record: VolumeRecord, outputs: list[Path], changes: list[ChangeRecord],
                 late: list[Path]) -> str:
    """The job's one-line result, as ``dicomnode jobs`` shows it."""
    message = f"{len(record.structures)} structures measured; {len(outputs)} objects built"
    if changes:
        message += f"; compared with {len(changes)} earlier stud{'y' if len(changes) == 1 else 'ies'}"
    if late:
        message += f"; {len(late)} object(s) for later studies (change SRs, summary pages)"
    return message


def _followup_sr(settings: Settings, later: Any, change: ChangeRecord, seg: Any | None,
                 model_info: ModelInfo) -> Path:
    """Build and save the follow-up SR of ``change`` in the later study's results (``later``: its CT,
    ``seg``: its SEG, from which each muscle is outlined on its key slice; None when it is gone).

    Its UIDs derive from both studies' content (:mod:`reporting.uids`), so building it again, from
    either study's job, gives the same object and the PACS keeps one copy.
    """
    from reporting.followup_sr import build_followup_sr

    out_dir = results_dir(settings, str(change.followup.series_instance_uid))
    sr = build_followup_sr(later, change, _prior_outputs(settings, change), model_info=model_info, seg=seg)
    path = _save(sr, out_dir / "outputs")
    change.save(out_dir / f"change-{change.baseline.series_instance_uid}.json", indent=2)
    return path


def later_followups(settings: Settings, job: JobInput, earlier: tuple[Any, Any] | None = None) -> list[Path]:
    """The follow-up SRs (and summaries) of later studies that this series is now the earlier study of.

    Pairing stores these comparisons when a baseline arrives after its follow-up; without this
    nothing would report them. The later study's CT comes from ``job.series_files`` (the store, or
    the files it was recorded offline from: :mod:`dicomnode.processing.sources`); when they are gone
    or unreadable the change stays recorded and the report is skipped, with a warning.
    With ``earlier`` (this series' CT and label map) the later study's summary is built again with
    this study as its baseline: pre and post key images and the change chart, a new instance of the
    later study's summary series with the UID the in-order flow gives that page (the page sent
    without a comparison stays what it was: no UID ever names two contents).
    """
    from dicomnode.clinical.pairing import changes_for_earlier_series
    from seg.io import load_dicom_series

    paths = []
    for change in changes_for_earlier_series(settings, job.series_instance_uid):
        later_uid = str(change.followup.series_instance_uid)
        files = job.series_files(later_uid)
        try:
            later = load_dicom_series(sorted(files))
        except (OSError, ValueError) as exc:
            log.warning("job %s: no follow-up report for later series %s: %s", job.job_id, later_uid,
                        _unread(exc) if files else "its instances are no longer stored")
            continue
        measured_by = _measured_by(settings, later_uid, job) if settings.output.followup_sr else None
        if measured_by is not None:
            paths.append(_followup_sr(settings, later, change, _stored_seg(settings, later_uid), measured_by))
        if settings.output.summary and earlier is not None and change.comparison != "previous":
            summary = _later_summary(settings, later, change, earlier)
            paths += [summary] if summary is not None else []
    return paths


def _measured_by(settings: Settings, series_uid: str, job: JobInput) -> ModelInfo | None:
    """The model that measured a stored series (its volumes.json), which its follow-up SR names;
    None, with a warning, when its results cannot be read."""
    try:
        return VolumeRecord.load(results_dir(settings, series_uid) / "volumes.json").model
    except (OSError, ValueError) as exc:
        log.warning("job %s: no follow-up report for a later series: its results cannot be read: %s",
                    job.job_id, exc)
        return None


def _stored_seg(settings: Settings, series_uid: str) -> Any | None:
    """The SEG the node built for ``series_uid`` (from its results folder), or None when it is gone."""
    import pydicom

    for path in sorted((results_dir(settings, series_uid) / "outputs").glob("*.dcm")):
        head = pydicom.dcmread(path, stop_before_pixels=True)
        if head.get("Modality") == "SEG":
            return pydicom.dcmread(path)
    log.warning("no SEG stored for the later series: its change report shows no outlines")
    return None


def _later_summary(settings: Settings, later: Any, change: ChangeRecord,
                   earlier: tuple[Any, Any]) -> Path | None:
    """The later study's summary again, now with ``change`` and the earlier study's key images."""
    from reporting.summary import build_summary
    from seg.io import load_nifti

    out_dir = results_dir(settings, str(change.followup.series_instance_uid))
    try:
        record = VolumeRecord.load(out_dir / "volumes.json")
        labels = load_nifti(out_dir / "labels.nii.gz")
    except (OSError, ValueError) as exc:
        log.warning("no summary for the later series: its results cannot be read: %s", exc)
        return None
    if labels.shape != later.shape:
        log.warning("no summary for the later series: its label map does not match its stored CT")
        return None
    later_labels = later.with_array(np.asarray(labels.array, dtype=np.uint8))
    sc = build_summary(later, record, record.model, change=change, labels=later_labels, baseline=earlier,
                       replaces_first=True)
    log.info("summary: a page with the comparison (instance 2) replaces the later study's first page")
    return _save(sc, out_dir / "outputs")


def _unread(exc: BaseException) -> str:
    """Why another series' CT could not be read, as a log line above DEBUG may say it: a system
    error's text and an undecodable slice's name the file, which for a series recorded offline is
    in the site's archive, perhaps under the patient's name (the text at DEBUG); else
    :func:`error_text`."""
    from dicomnode.logs import error_text
    from seg.io import PixelDecodeError

    log.debug("the other series' CT cannot be read: %s: %s", type(exc).__name__, exc)
    if isinstance(exc, OSError):
        return f"{type(exc).__name__} (its text is logged at DEBUG)"
    if isinstance(exc, PixelDecodeError):
        return (f"{type(exc).__name__}: a slice's pixel data ({exc.syntax}) cannot be decoded "
                "(its file is named at DEBUG)")
    return error_text(exc)


def stored_study(settings: Settings, job: JobInput, series_uid: str) -> tuple[Any, Any] | None:
    """An earlier series' CT (``job.series_files``) and label map (its results), on the CT's grid.

    None, with a warning, when either is gone (retention, or results of another node version):
    the summary then shows this study's key images alone.
    """
    from seg.io import load_dicom_series, load_nifti

    files = job.series_files(series_uid)
    label_file = results_dir(settings, series_uid) / "labels.nii.gz"
    try:
        ct = load_dicom_series(sorted(files))
        labels = load_nifti(label_file)
    except (OSError, ValueError) as exc:
        log.warning("job %s: no baseline key images of series %s: %s", job.job_id, series_uid,
                    _unread(exc) if files else "the baseline's instances are no longer stored")
        return None
    if labels.shape != ct.shape:
        log.warning("job %s: no baseline key images: its label map does not match its stored CT", job.job_id)
        return None
    return ct, ct.with_array(np.asarray(labels.array, dtype=np.uint8))


def _record_for_pairing(settings: Settings, ct: Any, out_dir: Path, seg_ds: Any,
                        sr_ds: Any) -> list[ChangeRecord]:
    from dicomnode.clinical.pairing import ResultRecord, record_result

    header = ct.header
    if header.study_instance_uid is None or header.series_instance_uid is None:
        raise ValueError("the series header has no Study or Series Instance UID")  # the store refuses such
    result = ResultRecord(
        patient_id=header.patient_id or "",
        issuer_of_patient_id=header.issuer_of_patient_id or "",
        patient_sex=header.sex or "",
        patient_size_m=header.size_m,
        study_instance_uid=header.study_instance_uid,
        study_date=header.study_date or "",
        study_time=header.study_time or "",
        series_instance_uid=header.series_instance_uid,
        volumes_json=out_dir / "volumes.json",
        seg_sop_instance_uid=str(seg_ds.SOPInstanceUID),
        sr_sop_instance_uid=str(sr_ds.SOPInstanceUID),
        result_dir=out_dir,
        patient_birth_date=header.birth_date or "",
    )
    return record_result(settings, result)


def _prior_outputs(settings: Settings, change: ChangeRecord) -> list[Any]:
    """The baseline's SEG and SR (headers only), the evidence a follow-up SR cites."""
    import pydicom

    folder = results_dir(settings, str(change.baseline.series_instance_uid)) / "outputs"
    wanted = {change.baseline.seg_sop_instance_uid, change.baseline.sr_sop_instance_uid}
    found = []
    for uid in sorted(u for u in wanted if u):
        path = folder / f"{uid}.dcm"
        if path.is_file():
            found.append(pydicom.dcmread(path, stop_before_pixels=True))
    return found
