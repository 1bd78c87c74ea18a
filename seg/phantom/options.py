"""What a phantom is asked to be (options) and what it comes back as (Phantom).

Kept apart from the anatomy and the renderer so the CLI, the tests and other packages can build
options without importing the heavy rendering code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from seg import labels as L
from seg.header import SeriesHeader
from seg.records import LeftRight
from seg.volume import Volume

# 1.1: the implant's streaks are made by projection (seg/phantom/metal_ct.py: hardened, photon-starved
# rays through metal, the error reconstructed by FBP), no longer drawn as seven lines through it.
# Pre-operative phantoms (no implant) are voxel for voxel those of 1.0.
PHANTOM_VERSION = "1.1"
Position = Literal["HFS", "FFS"]
# "ascending": instance 1 at the lowest z (feet); "descending": head first
SliceOrder = Literal["ascending", "descending"]
PhantomSex = Literal["F", "M"]


def _one_of(name: str, value: object, choices: Any, optional: bool = False) -> None:
    """Refuse ``value`` unless it is one of the Literal ``choices`` (or None when ``optional``): a
    dataclass does not check its annotations, and a value outside them would render silently."""
    allowed = [*get_args(choices), *([None] if optional else [])]
    if value not in allowed:
        words = [str(a) for a in allowed]
        raise ValueError(f"{name} must be {', '.join(words[:-1])} or {words[-1]}")


@dataclass
class PhantomOptions:
    """Everything that decides a phantom; the same options always give the same voxels and UIDs."""

    seed: int = 0
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 3.0)  # (column, row, slice)
    # In-plane field of view (x width, y height) in mm; None = fit the body (+ couch) automatically.
    fov_mm: tuple[float, float] | None = None
    # Scan range in mm along z relative to the femoral head centre (after height scaling);
    # None = L4/iliac crest down to below the knee. Small ranges make fast test phantoms.
    z_range_mm: tuple[float, float] | None = None
    # Reconstructed slice thickness (SliceThickness, z blur); None = the slice spacing.
    slice_thickness_mm: float | None = None
    position: Position = "HFS"
    slice_order: SliceOrder = "ascending"
    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str = "20240101"  # YYYYMMDD
    study_time: str = "120000"
    sex: PhantomSex | None = None  # None = random by seed
    height_m: float | None = None  # None = random by seed and sex
    postop: bool = False
    atrophy: dict[str, float] = field(default_factory=dict)  # structure name -> volume factor (0.8 = -20 %)
    fat_infiltration: float = 0.0  # 0..1 fraction of fat mixed into muscle HU (operated side if implant)
    implant_side: LeftRight | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    write_height: bool = True  # write PatientSize (height) into the DICOM header
    noise: bool = True  # add CT noise (tests of pure geometry may switch it off)
    series_number: int = 1
    accession_number: str | None = None

    def __post_init__(self) -> None:
        self.spacing_mm = tuple(float(v) for v in self.spacing_mm)  # type: ignore[assignment]
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError("spacing_mm must be three positive numbers (column, row, slice)")
        if self.slice_thickness_mm is not None and not 0 < float(self.slice_thickness_mm) <= 20:
            raise ValueError("slice_thickness_mm must be within (0, 20] mm")
        _one_of("position", self.position, Position)
        _one_of("slice_order", self.slice_order, SliceOrder)
        _one_of("sex", self.sex, PhantomSex, optional=True)
        _one_of("implant_side", self.implant_side, LeftRight, optional=True)
        if not 0.0 <= self.fat_infiltration <= 1.0:
            raise ValueError("fat_infiltration must be within 0..1")
        for name, f in self.atrophy.items():  # checked here, where the command line's errors are caught
            if name not in L.LABEL_OF or not L.by_name(name).is_muscle:
                raise ValueError(f"atrophy: {name!r} is not a muscle of the class list")
            if not 0.0 <= float(f) <= 1.0:
                raise ValueError(f"atrophy factor for {name} must be within 0..1 (volume kept)")
        if self.fov_mm is not None:
            self.fov_mm = tuple(float(v) for v in self.fov_mm)  # type: ignore[assignment]
        if self.z_range_mm is not None:
            lo, hi = (float(v) for v in self.z_range_mm)
            if hi <= lo:
                raise ValueError("z_range_mm must be (low, high) with high > low")
            self.z_range_mm = (lo, hi)

    def key(self) -> str:
        """A stable digest of every option; the seed for derived UIDs."""
        d = asdict(self)
        d.pop("study_uid")
        d.pop("series_uid")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Phantom:
    """A rendered phantom: CT (int16 HU) and labels (uint8) on the same grid, plus its patient."""

    ct: Volume
    labels: Volume
    height_m: float
    sex: str
    header: SeriesHeader
    options: PhantomOptions
    # Per structure label: (left voxels, right voxels) as built, for checking the measured split.
    side_voxels: dict[int, tuple[int, int]] = field(default_factory=dict)
