"""Metal artefact reduction (LI-MAR) of a CT before anything else reads it.

Why: the implant's streaks darken muscle and brighten fat near the hip, and the paper's HU window
(-57..164) then clips streaked muscle to fat and lights fat as muscle: the model and the HU
refinement measure the operated side's atrophy wrongly (docs/models.md, issue #11). Streaks are
what a scanner makes of inconsistent projections through metal, so they are removed in projection
space: each axial slice holding metal is projected (:mod:`seg.tomo`), the rays through metal (the
metal trace) are replaced by linear interpolation from their neighbours in each projection, and the
difference is reconstructed. That difference (original - corrected) is computed on a coarse
in-plane work grid cropped around the metal, resampled to the CT's grid and subtracted from the
non-metal voxels; metal voxels, and slices without metal, are left as they were.

Metal is the QA's rule (CT number above :data:`seg.metal_proximity.METAL_HU`); axis 2 is the slice axis
(the node reads axial series, as :mod:`seg.metal_proximity`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from seg.metal_proximity import METAL_HU, slices_with_metal, widen_in_plane
from seg.preprocess_config import MetalArtefactReduction
from seg.tomo import ParallelBeam
from seg.volume import Volume


@dataclass(frozen=True)
class MarConfig:
    """How the reduction is computed; the values are measured (benchmarks/mar_effect.py)."""

    work_mm: float = 2.5  # in-plane pixel of the work grid (3 mm left more streaks in the window)
    reach_mm: float = 90.0  # the work grid covers the metal's box widened by this in-plane
    n_angles: int = 120  # projections over 180 degrees (360 measured no better)
    # The metal trace: rays crossing at least this much metal, in work pixels. Any metal at all
    # (1e-3) widens the trace by the coarse pixels the metal's edge only touches, and the wider
    # interpolation leaves more error than those rays carry.
    trace_min: float = 0.3
    batch: int = 8  # slices projected together (memory ~ batch * n_angles * size^2 floats)


def as_configured(ct: Volume, method: MetalArtefactReduction, streak_net: torch.nn.Module | None = None,
                  ) -> Volume:
    """``ct`` as a package's preprocessing wants it before anything reads it: the one place that
    turns the configured method into the reduction, for inference and for the training cache alike
    (a model trained on corrected CTs must see corrected CTs). "li+learned" needs the package's
    ``streak_net`` (:mod:`seg.streak_net`)."""
    if method == "none":
        return ct
    reduced = reduce_metal_artefacts(ct)
    if method == "li":
        return reduced
    if streak_net is None:
        raise ValueError("metal artefact reduction 'li+learned' needs the package's streak correction")
    from seg.streak_net import correct_streaks

    return correct_streaks(reduced, streak_net)


def reduce_metal_artefacts(ct: Volume, config: MarConfig | None = None) -> Volume:
    """``ct`` with its metal streaks reduced; the same object when no voxel holds metal."""
    cfg = config or MarConfig()
    hu = ct.array
    metal_k = np.flatnonzero(slices_with_metal(hu))
    if metal_k.size == 0:
        return ct
    sub = hu[:, :, metal_k]
    metal = sub > METAL_HU
    di, dj = ct.spacing_mm[:2]
    box = metal_reach_box(metal, cfg.reach_mm, (di, dj))
    crop_hu, crop_metal = sub[box], metal[box]
    fine = crop_hu.shape[:2]
    work = (max(2, round(fine[0] * di / cfg.work_mm)), max(2, round(fine[1] * dj / cfg.work_mm)))
    beam = ParallelBeam.covering(work, cfg.n_angles)
    out = hu.copy()
    for b0 in range(0, metal_k.size, cfg.batch):
        b = slice(b0, min(b0 + cfg.batch, metal_k.size))
        corr = _correction(crop_hu[:, :, b], crop_metal[:, :, b], work, beam, cfg.trace_min)
        m = crop_metal[:, :, b]
        fixed = np.where(m, crop_hu[:, :, b], crop_hu[:, :, b] - corr)
        out[box[0], box[1], metal_k[b]] = stored_as(fixed, out.dtype)
    return ct.with_array(out)


def metal_reach_box(metal: np.ndarray, reach_mm: float, spacing_mm: tuple[float, float],
                    ) -> tuple[slice, slice]:
    """The in-plane box of the metal in ``metal`` [h, w, C] (in any of its slices) widened by
    ``reach_mm``: where a correction of the slices holding metal is computed (this reduction and
    the learned one after it, :mod:`seg.streak_net`)."""
    ii, jj = np.nonzero(metal.any(axis=2))
    box = (slice(int(ii.min()), int(ii.max()) + 1), slice(int(jj.min()), int(jj.max()) + 1))
    return widen_in_plane(box, reach_mm, spacing_mm, metal.shape[:2])


def stored_as(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Corrected CT numbers ``values`` in the CT's ``dtype``: rounded and clipped to its range when
    that is an integer type, as a stored CT is."""
    if np.issubdtype(dtype, np.integer):
        values = np.clip(np.rint(values), np.iinfo(dtype).min, np.iinfo(dtype).max)
    return values.astype(dtype)


def _correction(hu: np.ndarray, metal: np.ndarray, work: tuple[int, int], beam: ParallelBeam,
                trace_min: float) -> np.ndarray:
    """original - LI-corrected, in HU, on the fine grid of ``hu`` [h, w, C] (float32).

    Metal pixels are set to water before projecting: every ray through them is interpolated anyway,
    and without their 4000 HU the coarse difference holds no blurred metal to spill onto its
    neighbours when resampled back.
    """
    tissue = np.where(metal, 1000.0, np.clip(hu, -1000.0, None) + 1000.0).astype(np.float32)
    both = torch.from_numpy(np.concatenate([tissue, metal.astype(np.float32)], axis=2))
    coarse = F.interpolate(both.permute(2, 0, 1)[None], size=work, mode="area")[0]
    c = hu.shape[2]
    sino = beam.project(beam.embed(coarse.numpy()))
    s = sino[:c].numpy()
    removed = (s - _interpolate_trace(s, sino[c:].numpy() > trace_min)).astype(np.float32)
    corr = beam.crop(beam.reconstruct(torch.from_numpy(removed)), work)  # [C, h', w']
    fine = F.interpolate(torch.from_numpy(corr)[None], size=hu.shape[:2], mode="bilinear",
                         align_corners=False)[0]
    return fine.permute(1, 2, 0).numpy()


def _interpolate_trace(s: np.ndarray, trace: np.ndarray) -> np.ndarray:
    """Each projection row of ``s`` [C, A, n] with its ``trace`` bins linearly interpolated from the
    nearest bins outside the trace on either side (the nearer one alone at a row's end)."""
    n = s.shape[-1]
    idx = np.broadcast_to(np.arange(n), s.shape)
    good = ~trace
    left = np.maximum.accumulate(np.where(good, idx, -1), axis=-1)
    right = n - 1 - np.maximum.accumulate(np.where(good[..., ::-1], idx, -1), axis=-1)[..., ::-1]
    has_l, has_r = left >= 0, right <= n - 1
    left, right = np.where(has_l, left, right), np.where(has_r, right, left)  # one side: that side
    lv = np.take_along_axis(s, np.clip(left, 0, n - 1), -1)
    rv = np.take_along_axis(s, np.clip(right, 0, n - 1), -1)
    w = (idx - left) / np.maximum(right - left, 1)
    fill = np.where(has_l | has_r, lv + w * (rv - lv), 0.0)
    return np.where(trace, fill, s)
