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


def left_mask(labels: Volume, ct: Volume | None = None, volumes: dict | None = None) -> np.ndarray:
    """Boolean mask (broadcastable to ``labels.array``) of voxels on the patient's left (+x in LPS).

    The plane is :func:`seg.measure.midline_x`, the same split that produced ``left_cm3`` in
    volumes.json (falling back to the recorded ``qa.midline_x_mm``), so SEG sides match the numbers.
    """
    try:
        from seg.measure import midline_x

        mid = float(midline_x(labels, ct)[0])
    except ImportError:
        mid = (volumes or {}).get("qa", {}).get("midline_x_mm")
        if mid is None:
            raise
    return _world_x(labels) > float(mid)


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


def plan_segments(labels: Volume, volumes: dict,
                  ct: Volume | None = None) -> tuple[list[SegmentInfo], np.ndarray]:
    """Segment list and the segment-number map (uint8/uint16, array[i, j, k]) for present structures."""
    by_label = {int(s["label"]): s for s in volumes.get("structures", [])}
    counts = np.bincount(labels.array.ravel(), minlength=len(structures()))
    left = None
    segments: list[SegmentInfo] = []
    lut_left = np.zeros(256, dtype=np.uint16)
    lut_right = np.zeros(256, dtype=np.uint16)
    for s in structures():
        if s.label == 0 or s.label >= len(counts) or counts[s.label] == 0:
            continue
        entry = by_label.get(s.label, {})
        split = entry.get("left_cm3") is not None or entry.get("right_cm3") is not None or not entry
        if not split:
            segments.append(SegmentInfo(len(segments) + 1, s.label, s.name, "both"))
            lut_left[s.label] = lut_right[s.label] = segments[-1].number
            continue
        if left is None:
            left = np.broadcast_to(left_mask(labels, ct, volumes), labels.shape)
        on = labels.array == s.label
        n_left = int(np.count_nonzero(on & left))
        if n_left:
            segments.append(SegmentInfo(len(segments) + 1, s.label, s.name, "left"))
            lut_left[s.label] = segments[-1].number
        if n_left < int(counts[s.label]):
            segments.append(SegmentInfo(len(segments) + 1, s.label, s.name, "right"))
            lut_right[s.label] = segments[-1].number
    dtype = np.uint8 if len(segments) < 256 else np.uint16
    arr = labels.array
    if left is None:
        seg_map = lut_left.astype(dtype)[arr]
    else:
        seg_map = np.where(left, lut_left.astype(dtype)[arr], lut_right.astype(dtype)[arr])
    return segments, seg_map


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
    # (i, j, k) = (column, row, slice)  ->  (frames, rows, columns)
    pixel_array = np.ascontiguousarray(np.transpose(seg_map, (2, 1, 0)))
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
