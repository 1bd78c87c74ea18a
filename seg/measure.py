"""Per-structure volumes from a label map: cm³, left/right, height-normalised index, and QA figures.

Volumes are voxel counts × the real voxel volume (|det| of the affine), so any spacing, slice
order and patient position give the same cm³. Left and right are split by the patient's
mid-sagittal plane, estimated as the midpoint between the two femora (patient's left = +x LPS).
"""

from __future__ import annotations

import csv
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seg import labels as L
from seg.age import age_at_study
from seg.height import PLAUSIBLE_RANGE_TEXT, height_from_patient_size, plausible_height
from seg.hu_refine import MUSCLE_HU
from seg.metal_proximity import METAL_HU, MetalBox, flagged, near_metal_counts, near_metal_share
from seg.records import CSV_COLUMNS, MetalLocation, ModelInfo, StructureVolume, VolumeQA, VolumeRecord
from seg.volume import Volume

log = logging.getLogger(__name__)

BODY_HU = -500  # a voxel above this CT number is body (or couch, clothing), not air
FEMUR = L.LABEL_OF["femur"]


def _world_x_slice(affine: np.ndarray, shape: tuple[int, int], k: int) -> np.ndarray:
    i = np.arange(shape[0], dtype=np.float64)[:, None]
    j = np.arange(shape[1], dtype=np.float64)[None, :]
    return affine[0, 0] * i + affine[0, 1] * j + (affine[0, 2] * k + affine[0, 3])


def _side_counts(arr: np.ndarray, affine: np.ndarray, mid: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxels per label (total, and on the patient's left: x > ``mid``), one slab at a time.

    Slabs run along the array's outermost axis in memory (i for the C-ordered maps inference writes,
    k for NIfTI's Fortran order), so each is contiguous; x is computed in :func:`_world_x_slice`'s
    order of operations, so every voxel falls on the same side whichever axis is chosen. When x
    varies along that axis alone (an axial series' C-ordered map), a whole slab lies on one side.
    """
    axis = int(np.argmax(np.abs(arr.strides)))
    a = affine[0]
    if all(a[d] == 0 for d in range(3) if d != axis):
        return _whole_slab_side_counts(arr, axis, a, mid, n)
    rest = [d for d in range(3) if d != axis]
    plane = dict(zip(rest, np.ix_(*(np.arange(arr.shape[d], dtype=np.float64) for d in rest)), strict=True))
    total = np.zeros(n, np.int64)
    left = np.zeros(n, np.int64)
    for s in range(arr.shape[axis]):
        c = {**plane, axis: float(s)}  # index grids (i, j, k) of this slab, broadcastable
        x = a[0] * c[0] + a[1] * c[1] + (a[2] * c[2] + a[3])
        sl = arr[(slice(None),) * axis + (s,)].astype(np.intp)  # a view (np.take would copy arr)
        counts = np.bincount((sl * 2 + (x > mid)).ravel(), minlength=2 * n).reshape(n, 2)
        total += counts.sum(axis=1)
        left += counts[:, 1]
    return total, left


_BLOCK_VOXELS = 1 << 21  # voxels counted at once: a few MB of temporaries, however large the series


def _whole_slab_side_counts(arr: np.ndarray, axis: int, a: np.ndarray, mid: float,
                            n: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_side_counts` where x depends on the slab alone: each slab's x by the same formula (the
    other axes' terms are 0 × index = 0 there too), and runs of slabs on one side counted together."""
    slabs = arr.shape[axis]
    coords = [0.0, 0.0, 0.0]
    on_left = np.zeros(slabs, dtype=bool)
    for s in range(slabs):
        coords[axis] = float(s)
        on_left[s] = a[0] * coords[0] + a[1] * coords[1] + (a[2] * coords[2] + a[3]) > mid
    per_block = max(1, _BLOCK_VOXELS // max(1, arr.size // max(1, slabs)))
    total = np.zeros(n, np.int64)
    left = np.zeros(n, np.int64)
    start = 0
    while start < slabs:
        stop = start + 1
        while stop < slabs and stop - start < per_block and on_left[stop] == on_left[start]:
            stop += 1
        counts = _value_counts(arr[(slice(None),) * axis + (slice(start, stop),)], n)
        total += counts
        if on_left[start]:
            left += counts
        start = stop
    return total, left


def _value_counts(block: np.ndarray, n: int) -> np.ndarray:
    """How many voxels of ``block`` hold each value 0..n-1 (values are known to be below n).

    uint8 voxels are counted in pairs (one uint16 per two voxels, 65,536 bins), then each byte of the
    pair is summed out: half the elements for bincount, which casts every one to a 64-bit index.
    """
    flat = block.reshape(-1)  # a view for a contiguous slab range
    if flat.dtype != np.uint8 or not flat.flags.c_contiguous or flat.size < 2:
        return np.bincount(flat.astype(np.intp, copy=False), minlength=n)[:n].astype(np.int64)
    even = flat.size - flat.size % 2
    pairs = np.bincount(flat[:even].view(np.uint16), minlength=1 << 16).reshape(256, 256)
    counts = pairs.sum(axis=0) + pairs.sum(axis=1)  # each byte of a pair, whichever the byte order
    if flat.size % 2:
        counts[flat[-1]] += 1
    return counts[:n].astype(np.int64)


def _world(affine: np.ndarray, idx: tuple[np.ndarray, ...]) -> np.ndarray:
    ijk = np.stack([np.asarray(v, np.float64) for v in idx], axis=1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def midline_x(labels: Volume, ct: Volume | None = None) -> tuple[float, str]:
    """x (LPS mm) of the mid-sagittal plane and how it was found.

    Midpoint between the two femora (1-D two-means on femur x) when both are present; else the
    centroid of all labelled voxels; else the body's centroid from the CT; else x = 0.
    """
    arr = labels.array
    idx = np.nonzero(arr == FEMUR)
    if idx[0].size > 50:
        x = _world(labels.affine, idx)[:, 0]
        c1, c2 = float(x.min()), float(x.max())
        for _ in range(30):
            mid = (c1 + c2) / 2
            lo, hi = x[x <= mid], x[x > mid]
            if lo.size == 0 or hi.size == 0:
                break
            n1, n2 = float(lo.mean()), float(hi.mean())
            if abs(n1 - c1) < 1e-6 and abs(n2 - c2) < 1e-6:
                break
            c1, c2 = n1, n2
        if c2 - c1 > 60.0:
            return (c1 + c2) / 2, "femora"
    idx = np.nonzero(arr)
    if idx[0].size:
        step = max(1, idx[0].size // 200000)
        x = _world(labels.affine, tuple(v[::step] for v in idx))[:, 0]
        return float(x.mean()), "labels"
    if ct is not None:
        idx = np.nonzero(ct.array > BODY_HU)
        if idx[0].size:
            step = max(1, idx[0].size // 200000)
            return float(_world(ct.affine, tuple(v[::step] for v in idx))[:, 0].mean()), "body"
    return 0.0, "origin"


_FEW_COMPONENTS = 8  # up to this many, each is counted by a comparison over the volume


def _largest_component(m: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(component labels, label of the largest) of a mask; None when it has one component or none."""
    from scipy import ndimage

    lab, n = ndimage.label(m)
    if n <= 1:
        return None
    if n <= _FEW_COMPONENTS:  # a few passes over the volume: cheaper than find_objects' pass and boxes
        counts = [np.count_nonzero(lab == c) for c in range(1, n + 1)]
    else:  # each component counted inside its bounding box: cheaper than a bincount over the volume
        counts = [np.count_nonzero(lab[box] == c) for c, box in enumerate(ndimage.find_objects(lab), start=1)]
    return lab, 1 + int(np.argmax(counts))


def _same_grid(a: Volume, b: Volume) -> bool:
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-2)


def measure_volumes(labels: Volume, ct: Volume | None = None, height_m: float | None = None,
                    height_source: str | None = None, model: ModelInfo | None = None) -> VolumeRecord:
    """The volumes.json record for a label map (optionally with its CT for QA figures).

    Height: the given ``height_m`` (with ``height_source``), else PatientSize from the series
    metadata; without either, ``index_cm3_m2`` stays null (height is never guessed) and
    ``height_source`` says why ("missing", "implausible PatientSize 170.00 m"). Plausibility is
    :mod:`seg.height`'s rule: an implausible PatientSize is not used, an implausible given height is an error.
    Age at the study: :func:`seg.age.age_at_study` of the header (PatientAge, else PatientBirthDate and
    StudyDate); missing when neither gives one.
    """
    if ct is not None and not _same_grid(labels, ct):
        raise ValueError(f"label map grid {labels.shape} does not match the CT grid {ct.shape}")
    arr = labels.array
    if arr.min() < 0 or arr.max() >= L.NUM_CLASSES:
        raise ValueError(f"label values must be within 0..{L.NUM_CLASSES - 1}")
    header = labels.header if ct is None else ct.header.filled_from(labels.header)
    if height_m is None:  # the provenance kept without a height too: "missing" or "implausible …"
        height_m, height_source = height_from_patient_size(header.size_m)
    elif not plausible_height(height_m):
        raise ValueError(f"height {height_m} m is not plausible (outside {PLAUSIBLE_RANGE_TEXT})")
    vox = labels.voxel_volume_cm3
    with ThreadPoolExecutor(max_workers=1) as beside:  # the CT's part on another core (numpy and
        ct_figures = beside.submit(_ct_figures, ct) if ct is not None else None  # scipy release the GIL)
        mid, how = midline_x(labels, ct)
        n = L.NUM_CLASSES
        total, left = _side_counts(arr, labels.affine, mid, n)
        figures = ct_figures.result() if ct_figures is not None else None
    near = _near_metal(arr, labels.affine, mid, figures)

    h2 = float(height_m) ** 2 if height_m is not None else None
    structures = []
    for s in L.structures()[1:]:
        v = float(total[s.label]) * vox
        lv = float(left[s.label]) * vox
        structures.append(StructureVolume(
            label=s.label, name=s.name, group=s.group,
            voxels=int(total[s.label]),
            volume_cm3=round(v, 4),
            left_cm3=round(lv, 4),
            right_cm3=round(v - lv, 4),
            index_cm3_m2=round(v / h2, 4) if h2 else None,
            **(_near_metal_fields(s.label, total, left, near) if near is not None and s.is_muscle else {}),
        ))

    nk = labels.shape[2]
    segmented = round(sum(st.volume_cm3 for st in structures if L.structures()[st.label].is_muscle), 4)
    qa = {
        **coverage_from_femoral_head(arr, labels.affine),
        "z_coverage_mm": round(nk * float(np.linalg.norm(labels.affine[:3, 2])), 3),
        "segmented_muscle_cm3": segmented,
        "midline_x_mm": round(mid, 3),
        "midline_method": how,
    }
    if ct is not None and figures is not None:
        qa |= _ct_qa(ct, mid, segmented, figures)
    age_years, age_source = age_at_study(header)
    return VolumeRecord(
        series_instance_uid=header.series_instance_uid,
        model=model or ModelInfo(),
        height_m=round(float(height_m), 4) if height_m is not None else None,
        height_source=height_source,
        age_years=age_years,
        age_source=age_source,
        structures=tuple(structures),
        qa=VolumeQA(**qa),
    )


def _near_metal(arr: np.ndarray, affine: np.ndarray, mid: float,
                figures: _CtFigures | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Voxels per label next to metal (total, left); zeros without metal, None without the CT."""
    if figures is None:
        return None
    if figures.metal_box is None:
        return np.zeros(L.NUM_CLASSES, np.int64), np.zeros(L.NUM_CLASSES, np.int64)
    return near_metal_counts(arr, figures.metal_box, affine, mid, L.NUM_CLASSES)


def _near_metal_fields(label: int, total: np.ndarray, left: np.ndarray,
                       near: tuple[np.ndarray, np.ndarray]) -> dict[str, object]:
    """A muscle's near-metal share and flag per side (:mod:`seg.metal_proximity`)."""
    out: dict[str, object] = {}
    for side, voxels, close in (("left", left[label], near[1][label]),
                                ("right", total[label] - left[label], near[0][label] - near[1][label])):
        share = near_metal_share(int(close), int(voxels))
        out[f"{side}_near_metal_share"] = round(share, 4)
        out[f"{side}_near_metal"] = flagged(share)
    return out


def coverage_from_femoral_head(arr: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """The scanned extent below and above the top of the femoral heads (mm along the patient's
    craniocaudal axis, slice edges included), or nothing when no slice holds femur.

    Why the femur: the scanner's z of one patient differs from scan to scan, the top of the femoral
    head does not; two CTs that reach different distances below it measure different lengths of the
    long thigh muscles, which a comparison would report as atrophy."""
    femur_slices = np.flatnonzero((arr == L.LABEL_OF["femur"]).any(axis=(0, 1)))
    if femur_slices.size == 0:
        return {}
    first, last = (float(affine[2, 3] + k * affine[2, 2]) for k in (0, arr.shape[2] - 1))  # LPS: +z up
    head_top = max(float(affine[2, 3] + k * affine[2, 2]) for k in (femur_slices[0], femur_slices[-1]))
    half = abs(float(affine[2, 2])) / 2
    ends = (first, last)
    return {"coverage_below_femoral_head_mm": round(head_top - min(ends) + half, 1),
            "coverage_above_femoral_head_mm": round(max(ends) + half - head_top, 1)}


@dataclass(frozen=True)
class _CtFigures:
    """What the QA needs from the CT alone (no label map, no midline): computed beside the labels' part."""

    hu_muscle_voxels: int
    metal_world: np.ndarray | None  # LPS mm of each metal voxel; None without metal
    metal_box: MetalBox | None  # the metal mask, cropped (what the muscles' proximity is measured to)


def _ct_figures(ct: Volume) -> _CtFigures:
    """Muscle-HU voxels of the body (the largest connected component above :data:`BODY_HU`, which
    drops couch and clothing) and where the metal is.

    Counted slab by slab along the outermost axis, the body's test folded into the HU test, so no
    volume-sized mask is kept; metal voxels are counted before they are listed (usually there are none).
    """
    hu = ct.array
    m = hu > BODY_HU
    found = _largest_component(m)
    axis = int(np.argmax(np.abs(hu.strides)))
    step = max(1, _BLOCK_VOXELS // max(1, hu.size // max(1, hu.shape[axis])))
    muscle = 0
    for start in range(0, hu.shape[axis], step):
        sl = (slice(None),) * axis + (slice(start, start + step),)
        body = m[sl] if found is None else found[0][sl] == found[1]
        h = hu[sl]
        muscle += int(np.count_nonzero(body & (h >= MUSCLE_HU[0]) & (h <= MUSCLE_HU[1])))
    metal = hu > METAL_HU
    if not np.count_nonzero(metal):
        return _CtFigures(muscle, None, None)
    where = np.nonzero(metal)
    return _CtFigures(muscle, _world(ct.affine, where), MetalBox.of(metal, where))


def _ct_qa(ct: Volume, mid: float, segmented_muscle_cm3: float, figures: _CtFigures) -> dict[str, object]:
    """The QA figures that need the CT: HU-threshold muscle, metal and where it lies."""
    hu_muscle = round(float(figures.hu_muscle_voxels) * ct.voxel_volume_cm3, 4)
    w = figures.metal_world
    out: dict[str, object] = {
        "hu_muscle_cm3": hu_muscle,
        "segmented_vs_hu_muscle": round(segmented_muscle_cm3 / hu_muscle, 4) if hu_muscle else None,
        "metal": w is not None,
        "metal_voxels": 0 if w is None else int(w.shape[0]),
    }
    if w is not None:
        nl = int(np.count_nonzero(w[:, 0] > mid))
        out["metal_where"] = MetalLocation(
            side="left" if nl == w.shape[0] else "right" if nl == 0 else "both",
            left_voxels=nl, right_voxels=int(w.shape[0] - nl),
            z_range_mm=(round(float(w[:, 2].min()), 2), round(float(w[:, 2].max()), 2)),
            centroid_mm=tuple(round(float(c), 2) for c in w.mean(axis=0)),
        )
    return out


def write_volumes(record: VolumeRecord, out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``volumes.json`` and ``volumes.csv`` (one row per structure) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp, cp = out / "volumes.json", out / "volumes.csv"
    record.save(jp)
    with cp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for s in record.structures:
            w.writerow(s.csv_row())
    return jp, cp
