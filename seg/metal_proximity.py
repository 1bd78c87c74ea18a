"""Which muscles lie next to the implant: the share of each muscle side within reach of metal.

Why: the implant's streaks and the atrophy around it make the volumes of the muscles beside it the
least reliable (docs/models.md, "Which muscles the outputs flag"); one "metal (left)" warning for the
whole study does not say which. Metal is the QA's rule (CT number above :data:`METAL_HU`);
the distance is in-plane (within the axial slice), as the streaks run, so a muscle far below the
implant's tip is not flagged however close it lies along z.

Only the slices holding metal are visited, each cropped to the metal's box widened by the reach:
a whole thigh costs a few tens of milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METAL_HU = 2500.0  # a CT number above this is metal: the QA's rule, and every module's that looks for it
NEAR_METAL_MM = 30.0  # in-plane reach from metal (calibrated: benchmarks/metal_proximity.py)
NEAR_METAL_SHARE = 0.2  # a muscle side with at least this share of its voxels in reach is flagged
NEAR_METAL_MARK = "†"  # how the page and the terminal tables mark a flagged muscle side


def slices_with_metal(hu: np.ndarray) -> np.ndarray:
    """Which slices (axis 2, as :class:`seg.volume.Volume` orders them) hold metal: one bool each.
    The one test the artefact reduction, the refinement and the benchmarks share."""
    return (np.asarray(hu) > METAL_HU).any(axis=(0, 1))


def widen_in_plane(box: tuple[slice, slice], reach_mm: float, spacing_mm: tuple[float, float],
                   shape: tuple[int, int]) -> tuple[slice, slice]:
    """The in-plane ``box`` widened by ``reach_mm`` on every side and clipped to ``shape``: the crop
    that holds everything within reach of the metal (this module's count and :mod:`seg.mar`)."""
    return tuple(slice(max(b.start - math.ceil(reach_mm / d), 0), min(b.stop + math.ceil(reach_mm / d), n))
                 for b, d, n in zip(box, spacing_mm, shape, strict=True))  # type: ignore[return-value]


@dataclass(frozen=True)
class MetalBox:
    """The metal of a CT, cropped: ``mask`` is ``hu > METAL_HU`` inside ``box`` (index slices)."""

    box: tuple[slice, slice, slice]
    mask: np.ndarray

    @classmethod
    def of(cls, metal: np.ndarray, where: tuple[np.ndarray, ...] | None = None) -> MetalBox | None:
        """The box of a whole-volume metal mask (``where``: its ``np.nonzero``, when already known);
        None when there is no metal."""
        where = np.nonzero(metal) if where is None else where
        if where[0].size == 0:
            return None
        box = tuple(slice(int(v.min()), int(v.max()) + 1) for v in where)
        return cls(box, np.ascontiguousarray(metal[box]))  # type: ignore[arg-type]


def near_metal_counts(labels: np.ndarray, metal: MetalBox, affine: np.ndarray, mid_x: float, n: int,
                      reach_mm: float = NEAR_METAL_MM) -> tuple[np.ndarray, np.ndarray]:
    """Voxels per label within ``reach_mm`` of metal in their own slice: (total, on the patient's
    left of ``mid_x``). Axis 2 of ``labels`` is the slice axis (the node reads axial series)."""
    from scipy import ndimage

    di, dj = (float(np.linalg.norm(affine[:3, d])) for d in (0, 1))
    (bi, bj, bk) = metal.box
    wide_i, wide_j = widen_in_plane((bi, bj), reach_mm, (di, dj), labels.shape[:2])
    (i0, i1), (j0, j1) = (wide_i.start, wide_i.stop), (wide_j.start, wide_j.stop)
    inner = (slice(bi.start - i0, bi.stop - i0), slice(bj.start - j0, bj.stop - j0))
    ii, jj = np.meshgrid(np.arange(i0, i1, dtype=np.float64), np.arange(j0, j1, dtype=np.float64),
                         indexing="ij")
    total = np.zeros(n, np.int64)
    left = np.zeros(n, np.int64)
    for k in range(bk.start, bk.stop):
        m = metal.mask[:, :, k - bk.start]
        if not m.any():
            continue
        free = np.ones((i1 - i0, j1 - j0), dtype=bool)
        free[inner] = ~m
        near = ndimage.distance_transform_edt(free, sampling=(di, dj)) <= reach_mm
        lab = labels[i0:i1, j0:j1, k][near].astype(np.intp)
        x = affine[0, 0] * ii[near] + affine[0, 1] * jj[near] + (affine[0, 2] * k + affine[0, 3])
        counts = np.bincount(lab * 2 + (x > mid_x), minlength=2 * n).reshape(n, 2)
        total += counts.sum(axis=1)
        left += counts[:, 1]
    return total, left


def near_metal_share(near: int, voxels: int) -> float:
    """The share of a muscle side's voxels in reach of metal (0 for an empty side)."""
    return near / voxels if voxels else 0.0


def flagged(share: float, threshold: float = NEAR_METAL_SHARE) -> bool:
    """The flag rule: enough of the muscle side lies next to metal that its volume is unreliable."""
    return share >= threshold
