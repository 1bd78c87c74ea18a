"""DICOM-SEG of the label map on the CT's own grid, in the CT's study, as a new series.

Why this shape: viewers show one segment per structure and side (so a left/right comparison is a
click), the SR points at those segment numbers, and the segmentation must overlay the CT exactly,
so the source instances (spatially sorted by :mod:`seg.io`) define the frames. BINARY uncompressed
is the default because every viewer reads it; LABELMAP (RLE or JPEG-LS) is a few MB instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

from reporting import codes
from reporting.uids import copy_identity, output_uid, tracking_uid
from seg.labels import structures
from seg.volume import Volume

SEG_SERIES_NUMBER = 9901
SIDES = ("left", "right")
_COMPRESSION = {"RLE": RLELossless, "JPEGLS": JPEGLSLossless, "JPEG-LS": JPEGLSLossless,
                "JPEGLSLOSSLESS": JPEGLSLossless, "NONE": ExplicitVRLittleEndian}


@dataclass(frozen=True)
class SegmentInfo:
    """One output segment: which label, which side ("left"/"right"/"both"), its number in the SEG."""

    number: int
    label: int
    name: str
    side: str


def algorithm_name(model_info: dict) -> str:
    name = str(model_info.get("name") or "unknown-model")
    if model_info.get("demo"):
        name += " DEMO (phantom-trained, not for clinical use)"
    return name[:64]


def algorithm_identification(model_info: dict) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=algorithm_name(model_info),
        family=pydicom.sr.codedict.codes.cid7162.ArtificialIntelligence,
        version=str(model_info.get("version") or "0")[:64],
        source="dicomnode",
    )


def exact_midline_x(labels: Volume, ct: Volume | None = None) -> float:
    """x (LPS mm) of the mid-sagittal plane as :func:`seg.measure.midline_x` finds it."""
    from seg.measure import midline_x

    return float(midline_x(labels, ct)[0])


def _world_x(vol: Volume) -> np.ndarray:
    """LPS x of every voxel, broadcastable to the array shape (cheap for axis-aligned grids)."""
    a = vol.affine
    x: np.ndarray = np.full((1, 1, 1), a[0, 3])
    for axis, n in enumerate(vol.shape):
        if a[0, axis] != 0:
            shape = [1, 1, 1]
            shape[axis] = n
            x = x + a[0, axis] * np.arange(n, dtype=np.float64).reshape(shape)
    return x


def _side_index(labels: Volume, mid: float) -> np.ndarray:
    """uint8 array in frame layout (k, j, i), C-contiguous: label * 2 + 1 on the patient's left (+x)."""
    t = labels.array.transpose(2, 1, 0)
    if t.dtype != np.uint8:
        t = t.astype(np.uint8)
    idx = np.left_shift(t, 1, order="C")
    left = (_world_x(labels) > mid).transpose(2, 1, 0).astype(np.uint8)
    np.bitwise_or(idx, left, out=idx)
    return idx


def _matches(counts: np.ndarray, volumes: dict, voxel_cm3: float) -> bool:
    """Do per-side voxel counts reproduce volumes.json's left_cm3 (rounded to 4 decimals)?"""
    for e in volumes.get("structures", []):
        if e.get("left_cm3") is None or 2 * int(e["label"]) + 1 >= len(counts):
            continue
        if abs(round(float(counts[2 * int(e["label"]) + 1]) * voxel_cm3, 4) - float(e["left_cm3"])) > 1e-6:
            return False
    return True


def plan_segments(labels: Volume, volumes: dict,
                  ct: Volume | None = None) -> tuple[list[SegmentInfo], np.ndarray]:
    """Segment list and the segment-number map in frame layout (k, j, i) for present structures.

    Sides use the mid-sagittal plane of :mod:`seg.measure` (left = +x in LPS): the plane recorded in
    ``qa.midline_x_mm`` when its split reproduces volumes.json's ``left_cm3`` exactly, else the plane
    recomputed by :func:`seg.measure.midline_x`; either way SEG sides equal the reported numbers.
    """
    n = len(structures())
    if int(labels.array.max(initial=0)) >= min(n, 128):
        raise ValueError(f"label values must be below {n}")
    recorded = (volumes.get("qa") or {}).get("midline_x_mm")
    mid = float(recorded) if recorded is not None else exact_midline_x(labels, ct)
    idx = _side_index(labels, mid)
    counts = np.bincount(idx.ravel(), minlength=2 * n)
    if recorded is not None and not _matches(counts, volumes, labels.voxel_volume_cm3):
        idx = _side_index(labels, exact_midline_x(labels, ct))
        counts = np.bincount(idx.ravel(), minlength=2 * n)
    by_label = {int(e["label"]): e for e in volumes.get("structures", [])}
    segments: list[SegmentInfo] = []
    lut = np.zeros(2 * n, dtype=np.uint16)
    for s in structures()[1:]:
        n_right, n_left = int(counts[2 * s.label]), int(counts[2 * s.label + 1])
        if n_left + n_right == 0:
            continue
        entry = by_label.get(s.label, {})
        split = entry.get("left_cm3") is not None or entry.get("right_cm3") is not None or not entry
        if not split:
            segments.append(SegmentInfo(len(segments) + 1, s.label, s.name, "both"))
            lut[2 * s.label] = lut[2 * s.label + 1] = segments[-1].number
            continue
        if n_left:
            segments.append(SegmentInfo(len(segments) + 1, s.label, s.name, "left"))
            lut[2 * s.label + 1] = segments[-1].number
        if n_right:
            segments.append(SegmentInfo(len(segments) + 1, s.label, s.name, "right"))
            lut[2 * s.label] = segments[-1].number
    dtype = np.uint8 if len(segments) < 256 else np.uint16
    return segments, lut.astype(dtype)[idx]


def segment_label(info: SegmentInfo) -> str:
    s = structures()[info.label]
    return s.display_name if info.side == "both" else f"{s.display_name} {info.side}"


def _segment_description(info: SegmentInfo, patient_id: str, model_info: dict) -> hd.seg.SegmentDescription:
    s = structures()[info.label]
    desc = hd.seg.SegmentDescription(
        segment_number=info.number,
        segment_label=segment_label(info)[:64],
        segmented_property_category=codes.ANATOMICAL_STRUCTURE,
        segmented_property_type=codes.structure_code(s),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(model_info),
        tracking_uid=tracking_uid(patient_id, s.name, info.side),
        tracking_id=f"{s.name} {info.side}",
        display_color=hd.color.CIELabColor.from_rgb(*s.rgb),
    )
    lat = codes.laterality_code(info.side)
    if lat is not None:
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [lat]
    return desc


def read_sources(ct: Volume) -> list[Dataset]:
    """Source CT headers in k order (spatially sorted by the loader)."""
    if not ct.source_files:
        raise ValueError("the CT has no source DICOM files (NIfTI input): a SEG needs source images")
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in ct.source_files]


def build_seg(ct: Volume, labels: Volume, volumes: dict, model_info: dict, seg_type: str = "BINARY",
              compression: str = "RLE", sources: list[Dataset] | None = None) -> Dataset:
    """The SEG dataset (``compression`` applies to LABELMAP only; BINARY stays uncompressed)."""
    if labels.shape != ct.shape:
        raise ValueError(f"label map {labels.shape} is not on the CT grid {ct.shape}")
    seg_type = seg_type.upper()
    if seg_type not in ("BINARY", "LABELMAP"):
        raise ValueError(f"seg_type must be BINARY or LABELMAP, not {seg_type!r}")
    sources = sources if sources is not None else read_sources(ct)
    if len(sources) != ct.shape[2]:
        raise ValueError(f"{len(sources)} source files for {ct.shape[2]} slices")
    src0 = sources[0]
    patient_id = str(src0.get("PatientID", ct.meta.get("PatientID", "")))
    segments, seg_map = plan_segments(labels, volumes, ct)
    if not segments:
        raise ValueError("no structure present in the label map: nothing to put in a SEG")
    pixel_array = seg_map  # already (frames, rows, columns) = (k, j, i)
    if seg_type == "BINARY":
        transfer_syntax = ExplicitVRLittleEndian
    else:
        transfer_syntax = _COMPRESSION.get(str(compression).upper().replace("_", "-"), None)
        if transfer_syntax is None:
            raise ValueError(f"unknown LABELMAP compression {compression!r} (RLE, JPEGLS or NONE)")
    series_uid = ct.meta.get("SeriesInstanceUID") or str(src0.SeriesInstanceUID)
    kind = f"SEG-{seg_type}"
    demo = bool(model_info.get("demo"))
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=seg_type,
        segment_descriptions=[_segment_description(s, patient_id, model_info) for s in segments],
        series_instance_uid=output_uid(series_uid, model_info, kind + "/series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=output_uid(series_uid, model_info, kind + "/instance"),
        instance_number=1,
        manufacturer="dicomnode",
        manufacturer_model_name=str(model_info.get("name") or "unknown-model")[:64],
        software_versions=str(model_info.get("version") or "0")[:64],
        device_serial_number="0",
        content_description=("Thigh muscle segmentation" + (" (DEMO model)" if demo else ""))[:64],
        content_label="THIGH_MUSCLES",
        content_creator_name="dicomnode^automatic",
        transfer_syntax_uid=transfer_syntax,
        omit_empty_frames=True,
    )
    seg.SeriesDescription = ("Thigh muscles SEG" + (" DEMO" if model_info.get("demo") else ""))[:64]
    copy_identity(seg, src0, ct.meta)
    codes.declare_schemes(seg)
    return seg
