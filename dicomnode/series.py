"""Series assembly and selection: when a series is complete, and whether it is usable whole-thigh CT.

Why: the PACS sends a series as a stream of instances with no end marker, so a series is *complete*
after ``stable_seconds`` without a new instance (Orthanc's StableAge). Then its headers alone
(``stop_before_pixels``) decide whether the pipeline may run: CT, axial, one consistent grid, no
missing or duplicate slice positions, enough slices and enough z-coverage. Anything else is
``rejected`` with the exact reason, so nothing is dropped silently. A content hash over the sorted
SOP Instance UIDs and file sizes keeps the same content from being processed twice.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.config import SelectionSettings, Settings
from dicomnode.db import Database, now
from dicomnode.logs import event

log = logging.getLogger(__name__)

AXIAL_TOLERANCE_DEG = 15.0
POSITION_TOL_MM = 0.01
HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "SliceThickness",
]


@dataclass
class Slice:
    """Geometry of one image plane (one single-frame instance, or one frame of an enhanced one)."""

    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    spacing: tuple[float, float] | None
    rows: int
    cols: int


@dataclass
class Selection:
    accepted: bool
    reason: str = ""
    n_slices: int = 0
    z_coverage_mm: float = 0.0
    slice_spacing_mm: float = 0.0
    modality: str = ""
    notes: list[str] = field(default_factory=list)


def content_hash(items: Iterable[tuple[str, int]]) -> str:
    """sha256 over sorted ``sop_uid:size`` lines: equal for a byte-identical re-send of the series."""
    h = hashlib.sha256()
    for sop_uid, size in sorted(items):
        h.update(f"{sop_uid}:{size}\n".encode())
    return h.hexdigest()


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _item(seq_owner: Any, keyword: str) -> Any:
    seq = seq_owner.get(keyword) if seq_owner is not None else None
    return seq[0] if seq else None


def slices_of(ds: Any) -> list[Slice]:
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
                Slice(
                    position=_floats(pos.get("ImagePositionPatient"), 3) if pos else None,
                    orientation=_floats(ori.get("ImageOrientationPatient"), 6) if ori else None,
                    spacing=_floats(pix.get("PixelSpacing"), 2) if pix else None,
                    rows=rows,
                    cols=cols,
                )
            )
        return out
    return [
        Slice(
            position=_floats(ds.get("ImagePositionPatient"), 3),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6),
            spacing=_floats(ds.get("PixelSpacing"), 2),
            rows=rows,
            cols=cols,
        )
    ]


def _fmt(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".") if abs(x - round(x)) > 0.05 else f"{round(x):d}"


def select_series(files: list[Path], selection: SelectionSettings) -> Selection:
    """Decide from headers alone whether a series is usable whole-thigh CT; say exactly why not."""
    import pydicom

    if not files:
        return Selection(False, "no instances")
    modalities: set[str] = set()
    slices: list[Slice] = []
    unreadable = 0
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        except Exception:
            unreadable += 1
            continue
        modalities.add(str(ds.get("Modality", "") or "?"))
        slices.extend(slices_of(ds))
    if unreadable:
        return Selection(False, f"unreadable header in {unreadable} instance(s)")
    modality = ",".join(sorted(modalities))
    if modalities != {"CT"}:
        return Selection(False, f"modality {modality} is not CT", modality=modality)
    sel = Selection(False, modality="CT", n_slices=len(slices))
    missing = sum(1 for s in slices if s.position is None or s.orientation is None)
    if missing:
        sel.reason = f"missing ImagePositionPatient/ImageOrientationPatient in {missing} slice(s)"
        return sel
    matrices = sorted({(s.rows, s.cols) for s in slices})
    if len(matrices) > 1:
        sel.reason = "inconsistent matrix: " + ", ".join(f"{r}×{c}" for r, c in matrices)
        return sel
    ori = np.array([s.orientation for s in slices], dtype=float)
    if np.abs(ori - ori[0]).max() > 1e-3:
        sel.reason = "inconsistent image orientation within the series"
        return sel
    row, col = ori[0, :3], ori[0, 3:]
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        sel.reason = "invalid ImageOrientationPatient"
        return sel
    normal /= norm
    tilt = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if tilt > AXIAL_TOLERANCE_DEG:
        plane = "sagittal" if abs(normal[0]) > abs(normal[1]) else "coronal"
        sel.reason = f"not axial: slice normal {tilt:.0f}° from the patient z axis ({plane})"
        return sel
    spacings = {s.spacing for s in slices}
    if None in spacings:
        sel.reason = "missing PixelSpacing"
        return sel
    sp = np.array(sorted(spacings), dtype=float)
    if np.abs(sp - sp[0]).max() > 1e-3:
        sel.reason = "inconsistent pixel spacing: " + ", ".join(f"{a:g}×{b:g} mm" for a, b in sp)
        return sel
    z = np.sort(np.array([np.dot(s.position, normal) for s in slices], dtype=float))
    if len(z) > 1:
        diffs = np.diff(z)
        dup = diffs < POSITION_TOL_MM
        if dup.any():
            at = float(z[1:][dup][0])
            sel.reason = (
                f"duplicate slice position at {_fmt(at)} mm ({int(dup.sum()) + 1} slices share positions)"
            )
            return sel
        step = float(np.median(diffs))
        big = diffs > 1.5 * step
        if big.any():
            i = int(np.argmax(big))
            sel.reason = (
                f"missing slices: gap of {_fmt(float(diffs[i]))} mm after {_fmt(float(z[i]))} mm "
                f"(slice spacing {_fmt(step)} mm)"
            )
            return sel
        if np.abs(diffs - step).max() > 0.1 * step + 0.01:
            sel.reason = f"irregular slice spacing ({_fmt(float(diffs.min()))}–{_fmt(float(diffs.max()))} mm)"
            return sel
        sel.slice_spacing_mm = step
        sel.z_coverage_mm = float(z[-1] - z[0]) + step
    problems = []
    if sel.z_coverage_mm < selection.min_z_extent_mm:
        problems.append(f"z-coverage {_fmt(sel.z_coverage_mm)} mm < {_fmt(selection.min_z_extent_mm)} mm")
    if len(slices) < selection.min_slices:
        problems.append(f"{len(slices)} slices < {selection.min_slices}")
    if problems:
        sel.reason = "; ".join(problems)
        return sel
    sel.accepted = True
    return sel


class StabilityWatcher:
    """Closes series that have been quiet for ``stable_seconds`` and queues or rejects their job."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.interval = max(0.05, min(0.5, settings.stable_seconds / 4))

    def due(self, t: float | None = None) -> list[tuple[int, str]]:
        cutoff = (t if t is not None else now()) - self.settings.stable_seconds
        rows = self.db.query(
            "SELECT j.id, j.series_uid FROM jobs j JOIN series s ON s.current_job = j.id"
            " WHERE j.state='receiving' AND s.last_received_at <= ? ORDER BY j.id",
            (cutoff,),
        )
        return [(int(r["id"]), str(r["series_uid"])) for r in rows]

    def check_once(self, t: float | None = None) -> list[int]:
        closed = []
        for job_id, series_uid in self.due(t):
            if self.close(job_id, series_uid):
                closed.append(job_id)
        return closed

    def close(self, job_id: int, series_uid: str) -> bool:
        """receiving → complete → queued | rejected (done when this exact content was processed already)."""
        t = now()
        cutoff = t - self.settings.stable_seconds
        with self.db.tx() as con:
            changed = con.execute(
                "UPDATE jobs SET state='complete', complete_at=?, updated_at=?"
                " WHERE id=? AND state='receiving'"
                " AND (SELECT last_received_at FROM series WHERE series_uid=? AND current_job=?) <= ?",
                (t, t, job_id, series_uid, job_id, cutoff),
            ).rowcount
            rows = con.execute(
                "SELECT path, sop_uid, size FROM instances WHERE series_uid=?", (series_uid,)
            ).fetchall()
        if not changed:
            return False
        files = sorted(Path(r["path"]) for r in rows)
        digest = content_hash((r["sop_uid"], int(r["size"] or 0)) for r in rows)
        try:
            sel = select_series(files, self.settings.selection)
        except Exception as exc:  # selection must never kill the watcher
            log.exception("selection failed")
            sel = Selection(False, f"selection failed: {type(exc).__name__}: {exc}")
        t = now()
        with self.db.tx() as con:
            state = con.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if state is None or state["state"] != "complete":
                return False  # re-opened meanwhile; the new job will be closed later
            dup = con.execute(
                "SELECT id FROM jobs WHERE series_uid=? AND content_hash=? AND id<>? AND state IN"
                " ('queued','running','sending','done') ORDER BY id LIMIT 1",
                (series_uid, digest, job_id),
            ).fetchone()
            if dup is not None:
                new_state = "done"
                reason = f"same content as job {dup['id']}: results not produced again"
            elif sel.accepted:
                new_state, reason = "queued", None
            else:
                new_state, reason = "rejected", sel.reason
            con.execute(
                "UPDATE jobs SET state=?, reason=?, content_hash=?, n_instances=?, updated_at=?,"
                " finished_at=CASE WHEN ? IN ('rejected','done') THEN ? ELSE NULL END WHERE id=?",
                (new_state, reason, digest, len(rows), t, new_state, t, job_id),
            )
        event(
            log,
            f"series {new_state}",
            logging.INFO if new_state != "rejected" else logging.WARNING,
            job=job_id,
            series=series_uid,
            instances=len(rows),
            slices=sel.n_slices,
            z_coverage_mm=round(sel.z_coverage_mm, 1),
            reason=reason or "",
        )
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.check_once()
            except Exception:
                log.exception("stability watcher")
            stop.wait(self.interval)
