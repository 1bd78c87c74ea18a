"""An implant's streak artefacts made the way a scanner makes them: projection errors through FBP.

Why: streaks painted over the image are consistent with no projection data, so no sinogram-domain
metal artefact reduction could ever remove them, and a model trained or judged on them learns
nothing a scanner's images need. Here each axial slice with metal is forward projected
(:mod:`seg.tomo`), the metal's line integrals are hardened (``p_m / (1 + k p_m)``) and photon-starved
(Poisson counts, at least one photon per ray), and only the error (measured - ideal) is
reconstructed by FBP, in HU: the caller adds it to the slice's body outside the metal.

Slices are simulated on a work grid of 3 mm (finer ones area-averaged, the error resampled back)
with 180 angles: the streaks stay finer than 1.0's drawn ones, and a 1.5 mm whole-thigh phantom
costs a few seconds more. The calibration (:data:`SCANNER`) was chosen so that, on the held-out
post-operative phantoms, the streaks are at least as strong as phantom 1.0's drawn ones (mean
|error| 10-50 mm and 50-100 mm from the metal; docs/models.md, "Phantom 1.1: streaks by
projection"; ``benchmarks/metal_streak_strength.py``): a phantom that is no easier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from seg.tomo import ParallelBeam

MU_WATER = 0.02  # 1/mm at ~70 keV: HU -> attenuation, mu = MU_WATER (HU + 1000) / 1000


@dataclass(frozen=True)
class MetalScan:
    """What decides the artefact: the metal's attenuation, beam hardening, dose, sampling."""

    mu_metal: float  # 1/mm: steel-like, between titanium (~0.15) and CoCr (~0.7); 3071 HU is 0.08
    k_harden: float  # beam hardening: the metal's integral p_m is measured as p_m / (1 + k p_m)
    i0: float  # photons per ray unattenuated: how starved the rays through metal are
    n_angles: int = 180  # projections over 180°
    work_mm: float = 3.0  # pixel size the projections are simulated at (never finer than the slice)


SCANNER = MetalScan(mu_metal=0.45, k_harden=0.03, i0=7.0e4)


def _to_work(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area average of a slice onto the (coarser) work grid ``shape``."""
    if img.shape == shape:
        return img.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(img, np.float32))[None, None]
    return F.adaptive_avg_pool2d(t, shape)[0, 0].numpy()


def streak_error(hu: np.ndarray, metal: np.ndarray, spacing_mm: float, seed: int,
                 scan: MetalScan = SCANNER) -> np.ndarray:
    """HU error (measured - ideal) of one axial slice ``hu`` (square pixels) holding ``metal``.

    Deterministic for a ``seed``; float32 of ``hu``'s shape. The error inside the metal is
    meaningless (the caller keeps the metal at 3071 HU).
    """
    shape = hu.shape
    f = max(1.0, scan.work_mm / spacing_mm)
    work = (max(1, round(shape[0] / f)), max(1, round(shape[1] / f)))
    d = spacing_mm * shape[0] / work[0]  # the work pixel (mm)
    tissue = np.where(metal, 0.0, np.clip(hu + 1000.0, 0.0, None) * (MU_WATER / 1000.0))
    beam = ParallelBeam.covering(work, scan.n_angles)
    imgs = beam.embed(np.stack([_to_work(tissue, work), _to_work(metal * np.float32(scan.mu_metal), work)]))
    p_t, p_m = beam.project(imgs).numpy().astype(np.float64) * d
    through = p_m > 1e-3
    # Beam hardening: the metal's integral comes out compressed, p_m / (1 + k p_m): p_m - k p_m² for a
    # thin implant, and still growing with the metal's thickness where the quadratic would turn back.
    err = np.where(through, p_m / (1.0 + scan.k_harden * p_m) - p_m, 0.0)
    # Photon starvation: Poisson counts on the rays through metal, at least one photon detected.
    p_meas = (p_t + p_m + err)[through]
    counts = np.maximum(np.random.default_rng(seed).poisson(scan.i0 * np.exp(-p_meas)), 1)
    err[through] += -np.log(counts / scan.i0) - p_meas
    mu_err = beam.reconstruct(torch.from_numpy((err / d).astype(np.float32))[None])  # pixels -> 1/mm
    hu_err = torch.from_numpy(beam.crop(mu_err, work)) * (1000.0 / MU_WATER)
    if work != shape:
        hu_err = F.interpolate(hu_err[None], size=shape, mode="bilinear", align_corners=False)[0]
    return hu_err[0].numpy().astype(np.float32)
