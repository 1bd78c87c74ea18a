"""One rule for whether image planes form a regular 3-D stack, and what is wrong when they do not.

Why: the node's series selection (:mod:`dicomnode.storage.series`) and the loader (:mod:`seg.io`)
checked orientation, pixel spacing, duplicate positions, gaps and irregular spacing each in code of
their own, with their own words, and drifted apart (positions written to 0.01 mm were accepted by one
and refused by the other). Both now ask :func:`check_stack`; the node stores the problem's code, the
loader raises its text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from seg.records import ReasonCode

GEOMETRY_TOL = 1e-3  # direction cosines, and pixel spacing in mm, that count as equal
DUPLICATE_TOL_MM = 0.01  # slices closer than this along the normal share a position
GAP_FACTOR = 1.5  # a step over this × the median slice spacing is a gap (missing slices)


@dataclass(frozen=True)
class Plane:
    """Geometry of one image plane (one single-frame instance, or one frame of an enhanced one)."""

    position: tuple[float, ...] | None  # ImagePositionPatient (3)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6)
    spacing: tuple[float, ...] | None  # PixelSpacing (2): row, column
    rows: int
    cols: int


@dataclass(frozen=True)
class Problem:
    """Why planes are no regular stack: ``code`` for the node's index, ``text`` for people; a gap
    also gives the median slice spacing (``step``) and the position it follows (``z``), in mm."""

    code: ReasonCode
    text: str
    step: float | None = None
    z: float | None = None


@dataclass(frozen=True)
class Gap:
    """The first step along the slice normal over GAP_FACTOR × the median spacing."""

    size_mm: float
    after_mm: float
    step_mm: float

    @property
    def text(self) -> str:
        return (f"gap of {mm(self.size_mm)} mm after {mm(self.after_mm)} mm"
                f" (slice spacing {mm(self.step_mm)} mm)")


@dataclass(frozen=True)
class Stack:
    """Planes that form one regular stack. ``order`` sorts the planes along ``normal`` (ascending
    ``z``); ``step`` is the median slice spacing (0 for a single plane)."""

    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    order: np.ndarray
    z: np.ndarray
    step: float


def mm(x: float) -> str:
    """A length as the reasons write it: whole millimetres, else one decimal."""
    return f"{x:.1f}".rstrip("0").rstrip(".") if abs(x - round(x)) > 0.05 else f"{round(x):d}"


def floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``n`` numbers from a multi-valued header element; None when absent or malformed."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def single_plane(ds: Any) -> Plane:
    """The plane of a single-frame image header (classic CT)."""
    return Plane(
        position=floats(ds.get("ImagePositionPatient"), 3),
        orientation=floats(ds.get("ImageOrientationPatient"), 6),
        spacing=floats(ds.get("PixelSpacing"), 2),
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
    )


def missing_geometry(n: int) -> Problem:
    return Problem(ReasonCode.MISSING_GEOMETRY,
                   f"missing ImagePositionPatient/ImageOrientationPatient in {n} slice(s)")


def spacing_irregular(gaps: np.ndarray, step: float) -> bool:
    """Slice gaps off their median ``step`` by more than 10 % + 0.01 mm. Positions rounded to what
    the header carries (0.625 mm slices written to 0.01 mm: gaps 0.62-0.63 mm) are a regular stack."""
    return bool(np.abs(gaps - step).max() > 0.1 * step + 0.01)


def first_gap(z: np.ndarray) -> Gap | None:
    """The first gap in sorted positions ``z`` along the normal; duplicates are not steps (they are
    a problem of their own), and fewer than two steps have no median to compare with."""
    diffs = np.diff(z)
    distinct = diffs >= DUPLICATE_TOL_MM
    after, diffs = z[:-1][distinct], diffs[distinct]
    if len(diffs) < 2:
        return None
    step = float(np.median(diffs))
    big = diffs > GAP_FACTOR * step
    if not big.any():
        return None
    i = int(np.argmax(big))
    return Gap(float(diffs[i]), float(after[i]), step)


def _axes(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Unit row, column and slice-normal directions; None for a zero or parallel pair of cosines."""
    row, col = orientation[:3], orientation[3:]
    lengths = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if min(lengths) < 1e-6:
        return None
    row, col = row / lengths[0], col / lengths[1]  # unit vectors, as the header means them
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return None
    return row, col, normal / norm


def _orientations(planes: Sequence[Plane]) -> np.ndarray | None:
    """The planes' cosines when all have one and they agree, else None."""
    if any(p.orientation is None for p in planes):
        return None
    ori = np.array([p.orientation for p in planes], dtype=float)
    return ori if np.abs(ori - ori[0]).max() <= GEOMETRY_TOL else None


def sorted_positions(planes: Sequence[Plane]) -> np.ndarray | None:
    """Positions along the slice normal, ascending; None when the planes cannot be compared (a
    missing position or orientation, orientations that differ or are invalid)."""
    ori = _orientations(planes) if planes else None
    axes = _axes(ori[0]) if ori is not None else None
    if axes is None or any(p.position is None for p in planes):
        return None
    return np.sort(np.array([p.position for p in planes], dtype=float) @ axes[2])


def check_stack(planes: Sequence[Plane], max_tilt_deg: float | None = None) -> Stack | Problem:
    """The stack the planes form, or the first problem: position and orientation present, one matrix,
    one valid orientation (within ``max_tilt_deg`` of axial when given), one valid pixel spacing, no
    duplicate position, no gap, regular spacing."""
    if not planes:
        raise ValueError("no planes")
    if missing := sum(p.position is None or p.orientation is None for p in planes):
        return missing_geometry(missing)
    matrices = sorted({(p.rows, p.cols) for p in planes})
    if len(matrices) > 1:
        return Problem(ReasonCode.INCONSISTENT_MATRIX,
                       "inconsistent matrix: " + ", ".join(f"{r}×{c}" for r, c in matrices))
    ori = _orientations(planes)
    if ori is None:
        return Problem(ReasonCode.INCONSISTENT_ORIENTATION,
                       "inconsistent image orientation within the series")
    axes = _axes(ori[0])
    if axes is None:
        return Problem(ReasonCode.INVALID_ORIENTATION, "invalid ImageOrientationPatient")
    row, col, normal = axes
    if max_tilt_deg is not None:
        tilt = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
        if tilt > max_tilt_deg:
            plane = "sagittal" if abs(normal[0]) > abs(normal[1]) else "coronal"
            return Problem(ReasonCode.NOT_AXIAL,
                           f"not axial: slice normal {tilt:.0f}° from the patient z axis ({plane})")
    spacings = {p.spacing for p in planes}
    if None in spacings:
        return Problem(ReasonCode.MISSING_PIXEL_SPACING, "missing PixelSpacing")
    sp = np.array(sorted(spacings), dtype=float)  # type: ignore[type-var]  (None was refused above)
    listed = ", ".join(f"{a:g}×{b:g} mm" for a, b in sp)
    if sp.min() <= 0:
        return Problem(ReasonCode.INVALID_PIXEL_SPACING, f"invalid PixelSpacing: {listed}")
    if np.abs(sp - sp[0]).max() > GEOMETRY_TOL:
        return Problem(ReasonCode.INCONSISTENT_PIXEL_SPACING, f"inconsistent pixel spacing: {listed}")
    d = np.array([p.position for p in planes], dtype=float) @ normal
    order = np.argsort(d, kind="stable")
    z = d[order]
    step = 0.0
    if len(z) > 1:
        diffs = np.diff(z)
        dup = diffs < DUPLICATE_TOL_MM
        if dup.any():
            return Problem(ReasonCode.DUPLICATE_SLICE_POSITION,
                           f"duplicate slice position at {mm(float(z[1:][dup][0]))} mm"
                           f" ({int(dup.sum()) + 1} slices share positions)")
        if gap := first_gap(z):
            return Problem(ReasonCode.SLICE_GAP, f"missing slices: {gap.text}", gap.step_mm, gap.after_mm)
        step = float(np.median(diffs))
        if spacing_irregular(diffs, step):
            return Problem(ReasonCode.IRREGULAR_SLICE_SPACING,
                           f"irregular slice spacing ({mm(float(diffs.min()))}–{mm(float(diffs.max()))} mm)")
    return Stack(row, col, normal, order, z, step)
