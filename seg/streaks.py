"""Metal-streak artefacts drawn over training crops (augmentation).

Why: after a hip fracture the operated femur holds an implant, and its streaks lift the fat where an
atrophied muscle used to lie into the HU range of muscle. The held-out post-operative phantoms show
that this alone keeps the measured pre→post loss of those muscles from the truth (docs/models.md,
"The implant is all that is left of the loss target"). The phantoms carry one implant, on one side,
whose streaks phantom 1.0 drew as seven lines (1.1 makes them by projection,
seg/phantom/metal_ct.py); this module puts streaks of any direction, strength and width over any
crop, pre-operative ones too, so thin bright or dark lines are seen as what they are everywhere.

The crops hold the windowed, gamma-corrected image (:mod:`seg.preprocess`); a streak is added in HU
(the window inverted, where fat below the window is taken to be ``FAT_HU``) and the sum windowed
again. The functions take numpy arrays or torch tensors alike (``scripts/gpu_leg.py`` crops on the
GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from seg.preprocess_config import PreprocessConfig

FAT_HU = -100.0  # what a voxel below the window (0 after windowing) is taken to be
AMPLITUDE_HU = (80.0, 700.0)  # phantom 1.0's streaks: 80…350 HU, times up to 2 for a large implant
WIDTH_SD_MM = (2.5, 5.0)  # phantom 1.0's: 3.5 mm
FADE_MM = (60.0, 120.0)  # e-folding distance from the implant; phantom 1.0's: 90 mm
MAX_STREAKS = 7  # phantom 1.0's implant drew 7

Array = TypeVar("Array")  # numpy.ndarray or torch.Tensor


@dataclass(frozen=True)
class Streaks:
    """One crop's streaks, in the crop's voxels (axes 0, 1 axial, 2 along the body).

    They radiate from ``centre`` (which may lie outside the crop, as the implant often does) over the
    axial slices ``z_from`` to ``z_to``.
    """

    centre: tuple[float, float]
    angles: tuple[float, ...]
    amplitudes_hu: tuple[float, ...]
    width_sd_vox: float
    fade_vox: float
    z_from: int
    z_to: int


def draw_streaks(rng: np.random.Generator, roi: tuple[int, int, int], spacing_mm: tuple[float, float, float]
                 ) -> Streaks:
    """Random streaks for one crop of ``roi`` voxels at ``spacing_mm``."""
    n = int(rng.integers(1, MAX_STREAKS + 1))
    centre = tuple(float(rng.uniform(-0.5 * r, 1.5 * r)) for r in roi[:2])
    amps = rng.uniform(*AMPLITUDE_HU, n) * np.where(rng.random(n) < 0.5, -1.0, 1.0)
    mm = float(np.mean(spacing_mm[:2]))
    span = int(rng.integers(roi[2] // 2, roi[2] + 1))
    z_from = int(rng.integers(0, roi[2] - span + 1))
    return Streaks(
        centre=(centre[0], centre[1]),
        angles=tuple(float(a) for a in rng.uniform(0.0, math.pi, n)),
        amplitudes_hu=tuple(float(a) for a in amps),
        width_sd_vox=float(rng.uniform(*WIDTH_SD_MM)) / mm,
        fade_vox=float(rng.uniform(*FADE_MM)) / mm,
        z_from=z_from,
        z_to=z_from + span,
    )


def streak_field(s: Streaks, roi: tuple[int, int, int]) -> np.ndarray:
    """The streaks in HU over the crop (float32, ``roi``): lines through the centre, Gaussian across,
    fading with the distance from the centre, as the phantom draws them (:mod:`seg.phantom.render`)."""
    xx, yy = np.meshgrid(np.arange(roi[0], dtype=np.float32) - s.centre[0],
                         np.arange(roi[1], dtype=np.float32) - s.centre[1], indexing="ij")
    fade = np.exp(-np.hypot(xx, yy) / s.fade_vox)
    plane = np.zeros(roi[:2], np.float32)
    for th, amp in zip(s.angles, s.amplitudes_hu, strict=True):
        across = -math.sin(th) * xx + math.cos(th) * yy
        plane += amp * np.exp(-((across / s.width_sd_vox) ** 2))
    field = np.zeros(roi, np.float32)
    field[:, :, s.z_from:s.z_to] = (plane * fade)[:, :, None]
    return field


def add_to_windowed(x: Array, field_hu: Array, pre: PreprocessConfig) -> Array:
    """``x`` (windowed and gamma-corrected, 0…1) with ``field_hu`` added in HU, windowed again."""
    lo, hi = pre.hu_window
    hu = lo + (hi - lo) * x.clip(0.0, 1.0) ** (1.0 / pre.gamma) + (FAT_HU - lo) * (x <= 0.0)
    return (((hu + field_hu - lo) / (hi - lo)).clip(0.0, 1.0)) ** pre.gamma
