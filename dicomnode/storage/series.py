"""Series assembly and selection: when a series is complete, and whether it is usable whole-thigh CT.

Why: the PACS sends a series as a stream of instances with no end marker, so a series is *quiet*
after ``stable_seconds`` without a new instance (Orthanc's StableAge). Quiet is not complete: an
interrupted transfer is quiet too, and measuring it would send results for part of a thigh. So a
quiet series is first checked for completeness (:func:`check_completeness`: contiguous slice
positions, no gap over 1.5× the median spacing, and the expected count where the headers give one,
ImagesInAcquisition, NumberOfSeriesRelatedInstances or the InstanceNumber range). An incomplete
series is *held* (left receiving) for ``selection.incomplete_hold_seconds`` after its last instance;
instances that arrive meanwhile complete it and it is checked again; otherwise it is ``rejected``.
The hold and the rejection carry the same reason: text beginning "incomplete:", and a code naming the
cause (``slice-gap``, ``acquisition-short``, ``series-short``, ``instance-numbers-missing``).

Then its headers alone (``stop_before_pixels``) decide whether the pipeline may run: CT, axial, one
consistent grid, no missing or duplicate slice positions, enough slices and enough z-coverage.
Anything else is ``rejected`` with the exact reason and a code for each cause (:class:`ReasonCode`,
``not-ct``, ``not-axial``, ``short-z-coverage`` …), so nothing is dropped silently. A content hash
over the sorted SOP Instance UIDs and file sizes keeps the same content from being processed twice;
when new content of a series whose earlier content has results is queued, the superseded results'
UIDs are logged for the PACS administrator (the new results get new UIDs, see reporting/uids.py).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.config import SelectionSettings, Settings
from dicomnode.db import Database, now
from dicomnode.logs import error_text, event
from dicomnode.processing import jobs
from dicomnode.processing.jobs import JobState, Reason, ReasonCode
from dicomnode.processing.outbox import OutboxState
from dicomnode.processing.wakeups import JOB_QUEUED
from seg.geometry import Plane, Stack, check_stack, first_gap, floats, mm, single_plane, sorted_positions
from seg.io import is_localizer, is_multi_frame, multi_frame_text

log = logging.getLogger(__name__)

AXIAL_TOLERANCE_DEG = 15.0
HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "ImageType",  # a localizer in the series is left out (seg.io.is_localizer)
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "SliceThickness",
    "InstanceNumber",
    "AcquisitionNumber",
    "ImagesInAcquisition",
    "NumberOfSeriesRelatedInstances",
]
INCOMPLETE = "incomplete"  # the first word of every incompleteness reason's text


@dataclass
class Selection:
    """The verdict on a series' headers: ``code`` names the cause of a refusal, ``reason`` says it."""

    accepted: bool
    reason: str = ""
    code: ReasonCode | None = None
    n_slices: int = 0
    z_coverage_mm: float = 0.0
    slice_spacing_mm: float = 0.0
    modality: str = ""
    notes: list[str] = field(default_factory=list)

    def refuse(self, code: ReasonCode, reason: str) -> Selection:
        self.accepted, self.code, self.reason = False, code, reason
        return self


@dataclass(frozen=True)
class Completeness:
    """Whether a quiet series looks whole; ``detail`` says what is missing, ``code`` why, when not."""

    complete: bool
    detail: str = ""
    code: ReasonCode | None = None

    def reason(self, held: bool) -> Reason:
        """The reason a job is held (``held``) or rejected for."""
        text = f"{INCOMPLETE}: {self.detail}"
        return Reason(self.code or ReasonCode.INCOMPLETE, f"held: {text}" if held else text)


def content_hash(items: Iterable[tuple[str, int]]) -> str:
    """sha256 over sorted ``sop_uid:size`` lines: equal for a byte-identical re-send of the series."""
    h = hashlib.sha256()
    for sop_uid, size in sorted(items):
        h.update(f"{sop_uid}:{size}\n".encode())
    return h.hexdigest()


def _item(seq_owner: Any, keyword: str) -> Any:
    seq = seq_owner.get(keyword) if seq_owner is not None else None
    return seq[0] if seq else None


def slices_of(ds: Any) -> list[Plane]:
    """The image planes of one header: one for classic CT, one per frame for Enhanced CT."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        shared = _item(ds, "SharedFunctionalGroupsSequence")
        out = []
        for frame in per_frame:

            def pick(group: str, frame: Any = frame) -> Any:
                return _item(frame, group) or _item(shared, group)

            pos = pick("PlanePositionSequence")
            ori = pick("PlaneOrientationSequence")
            pix = pick("PixelMeasuresSequence")
            out.append(
                Plane(
                    position=floats(pos.get("ImagePositionPatient"), 3) if pos else None,
                    orientation=floats(ori.get("ImageOrientationPatient"), 6) if ori else None,
                    spacing=floats(pix.get("PixelSpacing"), 2) if pix else None,
                    rows=rows,
                    cols=cols,
                )
            )
        return out
    return [single_plane(ds)]


def read_headers(files: list[Path]) -> tuple[list[Any], int]:
    """The headers selection and completeness need, and how many files could not be read.

    A plain native file is walked for just these elements (:func:`seg.native_dicom.read_header`: 397 slices
    in 0.06 s against pydicom's 0.15 s); anything else is read by pydicom as before.
    """
    import pydicom
    from pydicom.datadict import tag_for_keyword

    from seg.native_dicom import read_file_header

    wanted = frozenset(tag_for_keyword(k) for k in HEADER_TAGS)
    headers = []
    unreadable = 0
    for path in files:
        try:
            ds = read_file_header(path, wanted)
            if ds is None:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            headers.append(ds)
        except (OSError, EOFError, ValueError, KeyError, IndexError, struct.error,
                pydicom.errors.InvalidDicomError):  # what a damaged or vanished file raises
            log.debug("header unreadable: %s", path, exc_info=True)
            unreadable += 1
    return headers, unreadable  # anything else is a defect: the watcher logs it with its traceback


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _expected_count(headers: list[Any], images: list[Any], n_positions: int) -> Completeness:
    """A shortfall against the count the headers announce (complete when none is announced or it is met).

    ``headers`` are every instance, a localizer included (the announced counts count it); ``images``
    the slices without it (a scout's InstanceNumber may lie anywhere, e.g. 999)."""
    if any(is_multi_frame(h) for h in headers):
        return Completeness(True)  # multi-frame: the count checks below are about single-frame instances
    by_acquisition: dict[str, list[Any]] = {}
    for h in headers:
        by_acquisition.setdefault(str(h.get("AcquisitionNumber", "") or ""), []).append(h)
    for acquisition, group in sorted(by_acquisition.items()):
        declared = {_int_or_none(h.get("ImagesInAcquisition")) for h in group} - {None}
        if len(declared) == 1 and len(group) < (wanted := declared.pop()):
            which = f" {acquisition}" if acquisition else ""
            return Completeness(False, f"{len(group)} of {wanted} images of acquisition{which} received"
                                " (ImagesInAcquisition)", ReasonCode.ACQUISITION_SHORT)
    total = {_int_or_none(h.get("NumberOfSeriesRelatedInstances")) for h in headers} - {None}
    if len(total) == 1 and len(headers) < (wanted := total.pop()):
        return Completeness(False, f"{len(headers)} of {wanted} instances received"
                            " (NumberOfSeriesRelatedInstances)", ReasonCode.SERIES_SHORT)
    numbers = [_int_or_none(h.get("InstanceNumber")) for h in images]
    if n_positions == len(images) and None not in numbers and len(set(numbers)) == len(numbers) > 1:
        lo, hi = min(numbers), max(numbers)  # type: ignore[type-var]
        missing = hi - lo + 1 - len(numbers)
        if missing > 0:
            return Completeness(False, f"{missing} instance number(s) missing between {lo} and {hi}",
                                ReasonCode.INSTANCE_NUMBERS_MISSING)
    return Completeness(True)


def check_completeness(headers: list[Any]) -> Completeness:
    """Whether a quiet series is whole: contiguous slice positions and the announced count (which
    counts a localizer in the series too, while its plane is no slice of the stack)."""
    images = [h for h in headers if not is_localizer(h)]
    slices = [s for h in images for s in slices_of(h)]
    z = sorted_positions(slices)  # None: geometry that cannot be compared, selection's to report
    if z is not None and (gap := first_gap(z)):  # the rule selection and the loader apply too
        return Completeness(False, gap.text, ReasonCode.SLICE_GAP)
    positions = {tuple(round(v, 2) for v in s.position) for s in slices if s.position is not None}
    return _expected_count(headers, images, len(positions))


def select_series(files: list[Path], selection: SelectionSettings) -> Selection:
    """Decide from headers alone whether a series is usable whole-thigh CT; say exactly why not."""
    headers, unreadable = read_headers(files)
    return select_headers(headers, unreadable, selection)


def select_headers(headers: list[Any], unreadable: int, selection: SelectionSettings) -> Selection:
    """:func:`select_series` on headers already read (``unreadable``: files that could not be)."""
    if not headers and not unreadable:
        return Selection(False).refuse(ReasonCode.NO_INSTANCES, "no instances")
    modalities: set[str] = set()
    slices: list[Plane] = []
    for ds in headers:
        modalities.add(str(ds.get("Modality", "") or "?"))
        if not is_localizer(ds):  # a scout in the series: the loader leaves it out too
            slices.extend(slices_of(ds))
    if unreadable:
        return Selection(False).refuse(ReasonCode.UNREADABLE_HEADER,
                                       f"unreadable header in {unreadable} instance(s)")
    modality = ",".join(sorted(modalities))
    if modalities != {"CT"}:
        return Selection(False, modality=modality).refuse(ReasonCode.NOT_CT, f"modality {modality} is not CT")
    sel = Selection(False, modality="CT", n_slices=len(slices))
    if not slices:
        return sel.refuse(ReasonCode.NO_INSTANCES, "no image slices: only localizer images")
    if multi := sum(is_multi_frame(h) for h in headers):
        # the loader reads one slice per instance: refused here with the cause, not by the worker later
        return sel.refuse(ReasonCode.MULTI_FRAME, multi_frame_text(multi))
    stack = check_stack(slices, max_tilt_deg=AXIAL_TOLERANCE_DEG)
    if not isinstance(stack, Stack):
        # a gap is SLICE_GAP, as check_completeness names it: the watcher finds it there first
        return sel.refuse(stack.code, stack.text)
    if len(stack.z) > 1:
        sel.slice_spacing_mm = stack.step
        sel.z_coverage_mm = float(stack.z[-1] - stack.z[0]) + stack.step
    problems: list[tuple[ReasonCode, str]] = []  # both are said; the first is the code
    if sel.z_coverage_mm < selection.min_z_extent_mm:
        problems.append((ReasonCode.SHORT_Z_COVERAGE,
                         f"z-coverage {mm(sel.z_coverage_mm)} mm < {mm(selection.min_z_extent_mm)} mm"))
    if len(slices) < selection.min_slices:
        problems.append((ReasonCode.TOO_FEW_SLICES, f"{len(slices)} slices < {selection.min_slices}"))
    if problems:
        return sel.refuse(problems[0][0], "; ".join(text for _, text in problems))
    sel.accepted = True
    return sel


def _judge_files(files: list[Path], rules: SelectionSettings) -> tuple[Completeness, Selection]:
    """Is the series whole, and is it one the model can measure? Read from its files (I/O, outside
    any transaction); a defect of the selection itself rejects the series, never stops the watcher."""
    try:
        headers, unreadable = read_headers(files)
        whole = check_completeness(headers) if not unreadable else Completeness(True)
        return whole, (select_headers(headers, unreadable, rules) if whole.complete else Selection(False))
    except Exception as exc:  # selection must never kill the watcher
        log.error("selection failed: %s", error_text(exc))
        log.debug("selection failed", exc_info=True)  # the traceback quotes values: DEBUG only
        return Completeness(True), Selection(False).refuse(ReasonCode.SELECTION_ERROR,
                                                           f"selection failed: {error_text(exc)}")


def verdict(whole: Completeness, sel: Selection, duplicate_of: int | None) -> tuple[JobState, Reason | None]:
    """Where a complete job goes once its hold is over: rejected when still incomplete, done when a
    job with the same content was processed (``duplicate_of``), queued when selected, else rejected
    with the selection's reason."""
    if not whole.complete:
        return JobState.REJECTED, whole.reason(held=False)
    if duplicate_of is not None:
        return JobState.DONE, Reason(ReasonCode.DUPLICATE_CONTENT,
                                     f"same content as job {duplicate_of}: results not produced again")
    if sel.accepted:
        return JobState.QUEUED, None
    return JobState.REJECTED, Reason(sel.code or ReasonCode.SELECTION_ERROR, sel.reason)


class StabilityWatcher:
    """Closes series that have been quiet for ``stable_seconds`` and queues or rejects their job.

    With ``series_complete_on_release`` the SCP also reports series whose delivering association was
    released (:meth:`release`); each is closed at the next check as if its quiet time had passed, unless
    an instance arrived after the release (then the quiet rule applies as before).
    """

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.interval = max(0.05, min(0.5, settings.stable_seconds / 4))
        self._released: dict[str, float] = {}  # series UID → when its association was released
        self._released_lock = threading.Lock()
        self._wake = threading.Event()  # a release, or the node stopping: check now

    def release(self, series_uids: Iterable[str]) -> None:
        """The association that delivered these series was released normally: close them now.

        Called from the SCP's association thread; the closing itself stays in the watcher's thread.
        """
        t = now()
        with self._released_lock:
            for series_uid in series_uids:
                self._released[series_uid] = t
        self._wake.set()

    def wake(self) -> None:
        """End the current wait of :meth:`run` (the node is stopping, or a release arrived)."""
        self._wake.set()

    def released_due(self) -> list[tuple[int, str, float]]:
        """(job, series, released at) of reported series still receiving with nothing newer than the
        release; the reports are consumed (a series with a later instance falls back to the quiet rule)."""
        with self._released_lock:
            released, self._released = self._released, {}
        t = now()
        out = []
        for series_uid, released_at in sorted(released.items()):
            row = self.db.query(
                "SELECT j.id FROM jobs j JOIN series s ON s.current_job = j.id WHERE s.series_uid=?"
                " AND j.state=? AND s.last_received_at <= ?"
                " AND (j.next_attempt_at IS NULL OR j.next_attempt_at <= ?)",
                (series_uid, JobState.RECEIVING.value, released_at, t),
            )
            if row:
                out.append((int(row[0]["id"]), series_uid, released_at))
        return out

    def due(self, t: float | None = None) -> list[tuple[int, str]]:
        """Receiving jobs whose series is quiet (and, if held as incomplete, whose hold has ended)."""
        t = t if t is not None else now()
        rows = self.db.query(
            "SELECT j.id, j.series_uid FROM jobs j JOIN series s ON s.current_job = j.id"
            " WHERE j.state=? AND s.last_received_at <= ?"
            " AND (j.next_attempt_at IS NULL OR j.next_attempt_at <= ?) ORDER BY j.id",
            (JobState.RECEIVING.value, t - self.settings.stable_seconds, t),
        )
        return [(int(r["id"]), str(r["series_uid"])) for r in rows]

    def next_wait(self, t: float | None = None) -> float:
        """Seconds until the next receiving series falls quiet, at most one polling interval.

        Why: polling alone adds half an interval on average (0.125 s at ``stable_seconds`` = 1) between
        a series falling quiet and its job being queued; waking at the due time removes it. A series
        that starts meanwhile is due no sooner than ``stable_seconds`` from now, after the next wake.
        """
        t = t if t is not None else now()
        row = self.db.query(
            "SELECT MIN(MAX(s.last_received_at + ?, COALESCE(j.next_attempt_at, 0))) AS due"
            " FROM jobs j JOIN series s ON s.current_job = j.id WHERE j.state=?",
            (self.settings.stable_seconds, JobState.RECEIVING.value),
        )
        due = row[0]["due"] if row else None
        if due is None or float(due) <= t:  # none, or one the last check left open: poll as before
            return self.interval
        return min(self.interval, float(due) - t + 0.002)

    def check_once(self, t: float | None = None) -> list[int]:
        closed = []
        for job_id, series_uid, released_at in self.released_due():
            event(log, "series released", logging.DEBUG, job=job_id, series=series_uid)
            if self.close(job_id, series_uid, released_at=released_at):
                closed.append(job_id)
        for job_id, series_uid in self.due(t):
            if self.close(job_id, series_uid):
                closed.append(job_id)
        return closed

    def close(self, job_id: int, series_uid: str, released_at: float | None = None) -> bool:
        """receiving → complete → queued | rejected (done when this exact content was processed already).

        An incomplete series goes back to receiving (held) until its hold ends; returns False then.
        ``released_at``: its association was released then, so it counts as quiet if nothing came since.
        """
        quiet = self._mark_complete(job_id, series_uid, released_at)
        if quiet is None:
            return False
        rows, last_received_at = quiet
        files = sorted(Path(r["path"]) for r in rows)
        digest = content_hash((r["sop_uid"], int(r["size"] or 0)) for r in rows)
        whole, sel = _judge_files(files, self.settings.selection)
        hold_until = (last_received_at or now()) + self.settings.selection.incomplete_hold_seconds
        if not whole.complete and now() < hold_until:
            return self._hold(job_id, series_uid, whole, hold_until)
        t = now()
        superseded: list[Any] = []
        with self.db.tx() as con:
            if jobs.state_of(con, job_id) is not JobState.COMPLETE:
                return False  # re-opened meanwhile; the new job will be closed later
            dup = con.execute(
                "SELECT id FROM jobs WHERE series_uid=? AND content_hash=? AND id<>? AND state IN"
                " (?, ?, ?, ?) ORDER BY id LIMIT 1",
                (series_uid, digest, job_id, JobState.QUEUED.value, JobState.RUNNING.value,
                 JobState.SENDING.value, JobState.DONE.value),
            ).fetchone()
            new_state, why = verdict(whole, sel, None if dup is None else int(dup["id"]))
            if new_state is JobState.QUEUED:
                # results of earlier content, and a SEG sent early by a job superseded while it ran
                superseded = con.execute(
                    "SELECT j.id, o.path FROM jobs j JOIN outbox o ON o.job_id = j.id WHERE j.series_uid=?"
                    " AND j.id<>? AND (j.state IN (?, ?) OR o.state=?) AND j.content_hash IS NOT ?"
                    " ORDER BY j.id, o.path",
                    (series_uid, job_id, JobState.SENDING.value, JobState.DONE.value, OutboxState.SENT.value,
                     digest),
                ).fetchall()
            jobs.move(con, job_id, new_state, t, reason=why, content_hash=digest, n_instances=len(rows))
        if new_state is JobState.QUEUED:  # the queued row is the queue entry: wake the worker
            JOB_QUEUED.set()
        event(
            log,
            f"series {new_state}",
            logging.INFO if new_state is not JobState.REJECTED else logging.WARNING,
            job=job_id,
            series=series_uid,
            instances=len(rows),
            slices=sel.n_slices,
            z_coverage_mm=round(sel.z_coverage_mm, 1),
            reason=why.text if why else "",
        )
        if superseded:
            self._announce_superseded(job_id, series_uid, superseded)
        return True

    def _mark_complete(self, job_id: int, series_uid: str, released_at: float | None,
                       ) -> tuple[list[Any], float | None] | None:
        """receiving → complete when nothing came for the stable time (or since ``released_at``): the
        series' instance rows and when its last one came; None when not quiet or no longer receiving."""
        t = now()
        cutoff = t - self.settings.stable_seconds
        if released_at is not None:
            cutoff = max(cutoff, released_at)
        with self.db.tx() as con:
            quiet = con.execute(
                "SELECT 1 FROM series WHERE series_uid=? AND current_job=? AND last_received_at <= ?",
                (series_uid, job_id, cutoff),
            ).fetchone()
            changed = quiet is not None and jobs.move(
                con, job_id, JobState.COMPLETE, t, expect={JobState.RECEIVING}) is not None
            rows = con.execute(
                "SELECT path, sop_uid, size FROM instances WHERE series_uid=?", (series_uid,)
            ).fetchall()
            last = con.execute(
                "SELECT last_received_at FROM series WHERE series_uid=?", (series_uid,)
            ).fetchone()
        if not changed:
            return None
        return rows, (float(last["last_received_at"]) if last and last["last_received_at"] else None)

    def _hold(self, job_id: int, series_uid: str, whole: Completeness, until: float) -> bool:
        """Back to receiving, to be checked again at ``until`` (or after any new instance settles)."""
        t = now()
        with self.db.tx() as con:
            held = jobs.move(con, job_id, JobState.RECEIVING, t, expect={JobState.COMPLETE},
                             next_attempt_at=until, reason=whole.reason(held=True))
        if held is not None:
            rejected_for = whole.reason(held=False)
            event(log, "series held", job=job_id, series=series_uid, reason=rejected_for.text,
                  reason_code=rejected_for.code, seconds_left=round(until - t, 1))
        return False

    @staticmethod
    def _announce_superseded(job_id: int, series_uid: str, rows: list[Any]) -> None:
        """Tell the PACS administrator which results the new content replaces (UIDs only, no PHI).

        Output files are named by their SOP Instance UID, so the outbox paths give the UIDs to delete.
        """
        earlier = sorted({int(r["id"]) for r in rows})
        uids = [Path(str(r["path"])).stem for r in rows]
        event(log, "earlier results superseded", job=job_id, series=series_uid,
              earlier_jobs=",".join(map(str, earlier)), superseded_sop_uids=",".join(uids))

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wake.clear()  # before the check: a release reported during it ends the wait below
            try:
                self.check_once()
            except Exception:
                log.exception("stability watcher")
            try:
                wait = self.next_wait()
            except Exception:
                log.exception("stability watcher")
                wait = self.interval
            self._wake.wait(wait)  # Node.stop calls wake(); a bare ``stop`` is seen within one interval
