"""The one shared image type: voxels plus their place in DICOM patient space (LPS, mm).

Every module that touches geometry goes through :class:`Volume`; nobody re-derives orientation
from DICOM tags a second time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seg.header import SeriesHeader

# NIfTI (and MONAI/ITK world space in nibabel) is RAS; DICOM is LPS. Flipping x and y converts.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3-D image indexed ``array[i, j, k]`` = (column, row, slice).

    ``affine`` maps homogeneous voxel indices (i, j, k, 1) to LPS millimetres. Slices are ordered so
    that k increases along the slice normal (row direction x column direction), whatever the order
    the instances arrived or were numbered in.
    """

    array: np.ndarray
    affine: np.ndarray
    # Identifying attributes of the source series (UIDs, patient, study); empty for NIfTI input.
    header: SeriesHeader = field(default_factory=SeriesHeader)
    # Source DICOM files ordered by k (empty for NIfTI input); the SEG references them.
    source_files: list[Path] = field(default_factory=list)
    # SOPInstanceUID per slice k (empty for NIfTI input).
    source_sop_uids: list[str] = field(default_factory=list)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def voxel_volume_cm3(self) -> float:
        """Volume of one voxel in cm³ (|det| of the direction-scaled matrix, mm³ / 1000)."""
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> Volume:
        """Same grid and provenance, other voxels (e.g. a label map on the CT's grid)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match the volume's {self.array.shape}")
        return Volume(array, self.affine.copy(), self.header, list(self.source_files),
                      list(self.source_sop_uids))

    def aligned_to(self, ref: Volume, atol_mm: float = 0.01) -> Volume:
        """These voxels on ``ref``'s grid, when the two are one grid stored in another axis order or
        direction (a label map a tool saved with its slices the other way, or in RAS voxel order);
        ``ref``'s provenance.

        Why only that: a label map on another grid would need resampling, which must never happen
        to a site's ground truth unseen; such a map is refused with both grids in the message.
        """
        idx = np.linalg.solve(self.affine, ref.affine)  # ref's voxel index -> this volume's index
        rot, shift = idx[:3, :3], idx[:3, 3]
        axes = [int(a) for a in np.argmax(np.abs(rot), axis=0)]  # this volume's axis along each of ref's
        signs = [float(np.sign(rot[a, r])) for r, a in enumerate(axes)]
        start = np.zeros(3)  # where ref's first voxel lies in this volume, along each of its axes
        for a, sign in zip(axes, signs, strict=True):
            start[a] = 0.0 if sign > 0 else self.shape[a] - 1
        tol = atol_mm / max(min(self.spacing_mm), 1e-6)
        ok = (sorted(axes) == [0, 1, 2] and np.allclose(np.abs(rot), np.eye(3)[axes].T, atol=tol)
              and all(self.shape[a] == n for a, n in zip(axes, ref.shape, strict=True))
              and np.allclose(shift, start, atol=tol))
        if not ok:
            def grid(v: Volume) -> str:
                return (f"{v.shape}, {tuple(round(x, 3) for x in v.spacing_mm)} mm, "
                        f"origin {np.round(v.affine[:3, 3], 2).tolist()}")
            raise ValueError(f"the label map is not on the CT's grid: {grid(self)} against the CT's "
                             f"{grid(ref)} (LPS); resample it onto the CT first")
        array = np.transpose(self.array, axes)
        array = np.flip(array, axis=tuple(r for r in range(3) if signs[r] < 0))
        return ref.with_array(np.ascontiguousarray(array))

    def in_lps_order(self) -> Volume:
        """The same voxels with the array axes running to the patient's left, posterior and head (+x,
        +y, +z): the order in which ``array[:, :, k].T`` is an axial image as radiologists read it
        (seen from the feet, the patient's right on the image's left, anterior up), whether the patient
        lay head- or feet-first. Axes are permuted and flipped, never resampled (an oblique grid goes to
        its nearest axes), and a view of the same voxels, not a copy (a feet-first CT is large). For
        display: the source files no longer follow k, so they are left out."""
        axes = [int(np.argmax(np.abs(self.affine[:3, i]))) for i in range(3)]  # world axis of each axis
        if sorted(axes) != [0, 1, 2]:
            raise ValueError("the grid has no axis along one of x, y, z")
        order = [axes.index(w) for w in range(3)]  # the array axis along x, y, z
        array, affine = np.transpose(self.array, order), self.affine[:, order + [3]].copy()
        for w in range(3):
            if affine[w, w] < 0:
                array = np.flip(array, axis=w)
                affine[:3, 3] += affine[:3, w] * (array.shape[w] - 1)
                affine[:3, w] = -affine[:3, w]
        return Volume(array, affine, self.header)

    def ras_affine(self) -> np.ndarray:
        """The affine in NIfTI's RAS convention, for nibabel/MONAI."""
        return LPS_TO_RAS @ self.affine

    def world_coords(self, index: np.ndarray) -> np.ndarray:
        """LPS mm of voxel indices given as an (N, 3) array."""
        idx = np.c_[np.asarray(index, dtype=float), np.ones(len(index))]
        return (self.affine @ idx.T).T[:, :3]
