"""HU refinement of a label map's edges on the CT grid: the paper's label definition, voxel by voxel.

Kim et al. made their labels by delineating each muscle and then thresholding fat out as background;
the network predicts on a 4 mm grid, so near every muscle/fat and bone/soft-tissue interface its
labels are up to a model voxel off. This step re-decides only the voxels within a thin band of each
predicted interface, by the CT number at full resolution:

- bone (femur, iliac bone): a predicted bone voxel near the bone's edge below ``bone_min_hu`` is not
  bone (background; the muscle step below may claim it); a voxel next to predicted bone at or above
  it is that bone;
- muscle: a predicted muscle voxel near the muscle's edge below ``muscle_hu[0]`` is fat (background);
  a background voxel near a muscle within ``muscle_hu`` becomes the label of the nearest muscle.

Deep inside a structure nothing changes, so fat infiltration (low HU *within* a muscle) stays muscle,
as the phantoms and the paper's volumes count it. Slices through a metal implant are refined too:
on post-operative phantoms (streaks of ±80…700 HU) leaving them as predicted cost 0.02 Dice and
raised the atrophied muscles' loss error, and refusing only the muscle's claims of background
near metal did not hold up on held-out phantoms either (docs/models.md). What a package may ask
there instead (``metal_slice_cut_min_background``): in those slices a muscle voxel is cut as fat
only where the network doubts it, because the streaks the metal artefact reduction leaves push one
muscle voxel in ten below the window beside the implant. The thresholds are the
body-composition convention for skeletal muscle (−29…150 HU). Which label a voxel belongs to is
still the network's call; only the muscle/not-muscle and bone/not-bone decision at the edge
follows the CT number.

Memory stays bounded: the volume is processed in slabs along its last axis, each with a halo
wide enough that every slab's result equals the whole-volume result.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from seg import labels as L
from seg.metal_proximity import slices_with_metal


def _label_range(names: list[str]) -> tuple[int, int]:
    """(first, last) label of ``names``, which the class table keeps as one run of labels."""
    values = sorted(L.LABEL_OF[n] for n in names)
    if values != list(range(values[0], values[-1] + 1)):
        raise RuntimeError(f"labels of {names} are not one run")
    return values[0], values[-1]


MUSCLE_HU: tuple[float, float] = (-29.0, 150.0)  # skeletal muscle, the body-composition convention
_MUSCLE = _label_range([s.name for s in L.structures() if s.is_muscle])
_BONE = _label_range(["femur", "iliac_bone"])


class HURefinement(BaseModel):
    """What a model package asks of the refinement (``model.json`` ``inference.hu_refinement``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    muscle_hu: tuple[float, float] = MUSCLE_HU
    bone_min_hu: float | None = 200.0  # None: bone edges are left as predicted
    muscle_band_mm: float = Field(3.0, gt=0, le=10)
    bone_band_mm: float = Field(2.0, gt=0, le=10)
    # A muscle claims a voxel the network called background only where the network's background
    # probability there is below this (None: wherever the CT number allows). Keeps vessels and
    # bowel next to a muscle out of it.
    claim_max_background: float | None = Field(None, gt=0, le=1)
    # In an axial slice holding metal the CT number is not the tissue's even after the metal
    # artefact reduction (its residual streaks leave muscle beside the implant ~40 HU RMS off, one
    # voxel in ten below the muscle window): there a voxel the network calls muscle is cut as fat
    # only where the network's background probability is at least this (None: wherever the CT
    # number says so, as in every other slice).
    metal_slice_cut_min_background: float | None = Field(None, gt=0, le=1)

    @property
    def reads_background(self) -> bool:
        """Whether the rule needs the network's background probability on the CT grid."""
        return self.claim_max_background is not None or self.metal_slice_cut_min_background is not None

    @model_validator(mode="after")
    def _ordered(self) -> HURefinement:
        if self.muscle_hu[0] >= self.muscle_hu[1]:
            raise ValueError(f"muscle_hu must be (low, high) with low < high, not {self.muscle_hu}")
        return self


def _half_widths(spacing_mm: tuple[float, float, float], band_mm: float) -> tuple[int, int, int]:
    """Per-axis voxels within ``band_mm`` (at least 0): the band is a box in millimetres."""
    return tuple(max(0, int(round(band_mm / s))) for s in spacing_mm)  # type: ignore[return-value]


def _box_any(mask: np.ndarray, half: tuple[int, ...]) -> np.ndarray:
    """Whether any voxel of ``mask`` lies within a box of ``half`` voxels per axis: the maximum
    filter of a boolean array with the box clipped at the border (scipy's ``mode="nearest"``), as
    2·half in-place ORs of shifted views per axis, several times faster than
    ``ndimage.maximum_filter`` for the few-voxel bands used here."""
    out = mask.copy()
    for axis, h in enumerate(half):
        if h == 0:
            continue
        src = out.copy()
        n = src.shape[axis]
        for shift in range(1, min(h, n - 1) + 1):
            low = tuple(slice(0, n - shift) if a == axis else slice(None) for a in range(mask.ndim))
            high = tuple(slice(shift, n) if a == axis else slice(None) for a in range(mask.ndim))
            out[low] |= src[high]
            out[high] |= src[low]
    return out


def _edge(mask: np.ndarray, half: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(inside the band, outside the band): mask voxels within ``half`` of a non-mask voxel, and
    non-mask voxels within ``half`` of a mask voxel."""
    return mask & _box_any(~mask, half), _box_any(mask, half) & ~mask


def _nearest_label(source: np.ndarray, todo: np.ndarray, steps: int) -> np.ndarray:
    """For each ``todo`` voxel, the label of ``source`` (0 = none) reached first by growing one
    six-connected ring at a time through ``todo`` voxels only (0 where none is reached within
    ``steps``; the highest label where two arrive together). Works on the ``todo`` voxels' flat
    indices, so its cost follows the band, not the volume."""
    grown = np.pad(source, 1).ravel()  # a padded copy: every neighbour index is valid
    shape = tuple(n + 2 for n in source.shape)
    where = np.flatnonzero(np.pad(todo, 1))
    offsets = (shape[1] * shape[2], -shape[1] * shape[2], shape[2], -shape[2], 1, -1)
    found = np.zeros(where.size, dtype=source.dtype)
    pending = np.arange(where.size)
    for _ in range(steps):
        if pending.size == 0:
            break
        at = where[pending]
        best = grown[at + offsets[0]]
        for off in offsets[1:]:
            np.maximum(best, grown[at + off], out=best)
        hit = best > 0
        grown[at[hit]] = best[hit]  # the next ring grows from these
        found[pending[hit]] = best[hit]
        pending = pending[~hit]
    out = np.zeros_like(source)
    out[todo] = found  # flatnonzero's order is the boolean index's order
    return out


def _crop(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """The box around ``mask``'s voxels widened by ``margin`` (None: no voxel). Found from the mask's
    projections on each axis, several times faster than ``ndimage.find_objects``."""
    box = []
    for axis, n in enumerate(mask.shape):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(0, int(hit[0]) - margin), min(n, int(hit[-1]) + 1 + margin)))
    return tuple(box)


def _member(labels: np.ndarray, classes: tuple[int, int]) -> np.ndarray:
    """``labels`` within the label range ``classes`` (first, last): two byte operations per voxel,
    where a lookup table indexed by the labels is several times slower."""
    first, last = classes
    return (labels - np.uint8(first)) <= np.uint8(last - first)  # uint8 wraps below ``first``


def _refine_edge(hu: np.ndarray, out: np.ndarray, tissue_labels: tuple[int, int], band_mm: float,
                 spacing: tuple[float, float, float], lo: float, hi: float | None, *,
                 claim_labelled: bool) -> None:
    """Re-decide, in place, the voxels of ``out`` within ``band_mm`` of a ``tissue_labels`` edge:
    tissue below ``lo`` becomes background; background (with ``claim_labelled``, any other label
    too) within [lo, hi] takes the nearest tissue label. Works inside the tissue's bounding box
    widened by the band, where every change lies."""
    half = _half_widths(spacing, band_mm)
    box = _crop(_member(out, tissue_labels), max(half) + 1)
    if box is None:
        return
    sub, h = out[box], hu[box]  # views: changing sub changes out
    tissue = _member(sub, tissue_labels)
    rim_in, rim_out = _edge(tissue, half)
    sub[rim_in & (h < lo)] = 0
    claim = rim_out & (h >= lo)
    if not claim_labelled:
        claim &= sub == 0
    if hi is not None:
        claim &= h <= hi
    if claim.any():
        near = _nearest_label(np.where(tissue, sub, 0).astype(np.uint8), claim, max(half) + 1)
        sub[near > 0] = near[near > 0]


def _refine_block(hu: np.ndarray, lab: np.ndarray, spacing: tuple[float, float, float],
                  rule: HURefinement) -> np.ndarray:
    out = lab.copy()
    if rule.bone_min_hu is not None:
        _refine_edge(hu, out, _BONE, rule.bone_band_mm, spacing, rule.bone_min_hu, None,
                     claim_labelled=True)
    _refine_edge(hu, out, _MUSCLE, rule.muscle_band_mm, spacing, *rule.muscle_hu,
                 claim_labelled=False)
    return out


def _halo(spacing: tuple[float, float, float], rule: HURefinement) -> int:
    """Slices on each side of a slab that can change its result: each stage looks ``half`` + the
    growth steps away, and the muscle stage sees the bone stage's output."""
    def reach(band: float) -> int:
        half = _half_widths(spacing, band)
        return half[2] + max(half) + 1
    bone = reach(rule.bone_band_mm) if rule.bone_min_hu is not None else 0
    return bone + reach(rule.muscle_band_mm) + 1


def _keep_confident_muscle(hu: np.ndarray, net: np.ndarray, out: np.ndarray, background: np.ndarray,
                           limit: np.uint8) -> None:
    """In the slices holding metal, give back to the network's muscle label, in place, the voxels the
    refinement cut as fat where the network's background probability is below ``limit``."""
    metal = slices_with_metal(hu)
    if not metal.any():
        return
    keep = (out == 0) & _member(net, _MUSCLE) & (background < limit)
    keep[:, :, ~metal] = False
    out[keep] = net[keep]


def refine_labels(hu: Any, labels: np.ndarray, spacing_mm: tuple[float, float, float],
                  rule: HURefinement, slab: int = 96, background: np.ndarray | None = None) -> np.ndarray:
    """``labels`` (uint8, CT grid) with their muscle and bone edges re-decided by ``hu``.

    ``background``: the network's background probability on the CT grid (uint8, ×255), required
    when the rule sets ``claim_max_background`` or ``metal_slice_cut_min_background``."""
    hu = np.asarray(hu)
    if hu.shape != labels.shape:
        raise ValueError(f"CT {hu.shape} and labels {labels.shape} are not on one grid")
    limit = cut_limit = None
    for name, value in (("claim_max_background", rule.claim_max_background),
                        ("metal_slice_cut_min_background", rule.metal_slice_cut_min_background)):
        if value is not None and (background is None or background.shape != labels.shape):
            raise ValueError(f"{name} needs the background probability on the CT grid")
    if rule.claim_max_background is not None:
        limit = np.uint8(math.ceil(rule.claim_max_background * 255 - 1e-9))
    if rule.metal_slice_cut_min_background is not None:
        cut_limit = np.uint8(math.ceil(rule.metal_slice_cut_min_background * 255 - 1e-9))
    spacing = tuple(float(s) for s in spacing_mm)
    halo = _halo(spacing, rule)  # type: ignore[arg-type]
    nz = labels.shape[2]
    out = np.empty_like(labels)
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        a, b = max(0, z0 - halo), min(nz, z1 + halo)
        block = labels[:, :, a:b]
        if not block.any():  # every label but background is a muscle or a bone
            out[:, :, z0:z1] = labels[:, :, z0:z1]
            continue
        done = _refine_block(hu[:, :, a:b], block, spacing, rule)  # type: ignore[arg-type]
        mine = done[:, :, z0 - a:z1 - a]
        if limit is not None:  # voxel by voxel: slabs change nothing
            mine[(labels[:, :, z0:z1] == 0) & _member(mine, _MUSCLE) & (background[:, :, z0:z1] >= limit)] = 0
        if cut_limit is not None:  # voxel by voxel too
            zs = (slice(None), slice(None), slice(z0, z1))
            _keep_confident_muscle(hu[zs], labels[zs], mine, background[zs], cut_limit)  # type: ignore[index]
        out[:, :, z0:z1] = mine
    return out
