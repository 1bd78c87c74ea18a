"""DICOM-SEG of the label map on the CT's own grid, in the CT's study, as a new series.

Why this shape: viewers show one segment per structure and side (so a left/right comparison is a
click), the SR points at those segment numbers, and the segmentation must overlay the CT exactly,
so the source instances (spatially sorted by :mod:`seg.io`) define the frames. The node sends
FRACTIONAL (RLE, values 0 or 255) by default: the Segmentation Storage class every PACS takes, whole
bytes per pixel so a current OHIF shows it correctly whatever the frame size (it garbles BINARY frames
that start mid-byte), and the right colours (it shifts them by one for a LABELMAP that describes its
background). BINARY and LABELMAP stay selectable; trade-offs in docs/conformance.md, "SEG encoding".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

from reporting import codes, iod_lookup, rle_encoder, seg_splice
from reporting.rules import RULES, ReportingRules, is_found
from reporting.seg_types import SEG_TYPES
from reporting.segframes import SegFrames
from reporting.source_header import read_source_headers
from reporting.uids import (
    copy_identity,
    date_series,
    output_uid,
    source_content,
    tracking_label,
    tracking_subject,
    tracking_uid,
)
from seg.header import SeriesHeader
from seg.labels import Structure, structures
from seg.measure import midline_x
from seg.records import ModelInfo, VolumeRecord
from seg.volume import Volume

log = logging.getLogger(__name__)
rle_encoder.install()  # FRACTIONAL/LABELMAP RLE frames: byte-identical, ~13x faster encoder
iod_lookup.install()  # highdicom's per-source-image IOD lookup answered once

SEG_SERIES_NUMBER = 9901
SIDES = ("left", "right")
_COMPRESSION = {"RLE": RLELossless, "JPEGLS": JPEGLSLossless}  # LABELMAP: the config's choices


@dataclass(frozen=True)
class SegmentInfo:
    """One output segment: which label, which side ("left"/"right"/"both"), its number in the SEG."""

    number: int
    label: int
    name: str
    side: str


def algorithm_name(model_info: ModelInfo) -> str:
    name = model_info.name or "unknown-model"
    if model_info.demo:
        name += " DEMO (phantom-trained, not for clinical use)"
    return name[:64]


def series_description(text: str, model_info: ModelInfo) -> str:
    """SeriesDescription of an output, "DEMO " first when the demo model made it.

    Why first: viewers' series lists cut a description after about 20 characters (OHIF 3.13 showed
    "Thigh muscles SEG DE..." and "Thigh muscle volumes ..."), so a trailing DEMO was not seen.
    """
    return (("DEMO " if model_info.demo else "") + text)[:64]


def algorithm_identification(model_info: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=algorithm_name(model_info),
        family=pydicom.sr.codedict.codes.cid7162.ArtificialIntelligence,
        version=(model_info.version or "0")[:64],
        source="dicomnode",
    )


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


def _frame_layout(array: np.ndarray) -> np.ndarray:
    """A new C-contiguous uint8 copy of an (i, j, k) volume in frame layout (k, j, i).

    Row by row (j): a plain transposed copy of a C-ordered volume (the label maps inference writes)
    strides across the whole array and is five times slower.
    """
    t = array.transpose(2, 1, 0)
    if t.flags.c_contiguous:
        return t.astype(np.uint8, copy=True)
    out = np.empty(t.shape, dtype=np.uint8)
    for j in range(array.shape[1]):
        out[:, j, :] = np.ascontiguousarray(array[:, j, :], dtype=np.uint8).T
    return out


def _side_index(labels: Volume, mid: float) -> np.ndarray:
    """uint8 array in frame layout (k, j, i), C-contiguous: label * 2 + 1 on the patient's left (+x)."""
    idx = _frame_layout(labels.array)
    np.left_shift(idx, 1, out=idx)
    left = (_world_x(labels) > mid).transpose(2, 1, 0).astype(np.uint8)
    np.bitwise_or(idx, left, out=idx)
    return idx


def _matches(counts: np.ndarray, volumes: VolumeRecord, voxel_cm3: float) -> bool:
    """Do per-side voxel counts reproduce volumes.json's left volumes (rounded to 4 decimals)?"""
    for e in volumes.structures:
        if e.left_cm3 is None or 2 * e.label + 1 >= len(counts):
            continue
        if abs(round(float(counts[2 * e.label + 1]) * voxel_cm3, 4) - e.left_cm3) > 1e-6:
            return False
    return True


@dataclass
class SegmentPlan:
    """Segments and where they are: ``idx`` = label*2 + left in frame layout (k, j, i), ``lut`` maps
    an idx value to its segment number, ``frame_box[k]`` = (row start, stop, column start, stop) of
    the labelled voxels of frame k, ``frame_counts[k, v]`` counts idx value v inside that box (exact
    for every label; the background values 0 and 1 are counted inside the box only)."""

    segments: list[SegmentInfo]
    idx: np.ndarray
    lut: np.ndarray
    frame_box: np.ndarray
    frame_counts: np.ndarray

    def seg_map(self) -> np.ndarray:
        dtype = np.uint8 if len(self.segments) < 256 else np.uint16
        return self.lut.astype(dtype)[self.idx]

    def values(self, number: int) -> list[int]:
        return [int(v) for v in np.flatnonzero(self.lut == number)]

    def present(self) -> np.ndarray:
        """Boolean (frames, segments + 1): segment n has voxels in frame k."""
        out = np.zeros((self.idx.shape[0], len(self.segments) + 1), dtype=bool)
        for v in np.flatnonzero(self.lut):
            out[:, int(self.lut[v])] |= self.frame_counts[:, v] > 0
        return out

    def box(self, frames: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
        """(row start, stop), (column start, stop) holding every labelled voxel of ``frames``."""
        b = self.frame_box[frames]
        return (int(b[:, 0].min()), int(b[:, 1].max())), (int(b[:, 2].min()), int(b[:, 3].max()))

    def mask(self, number: int, k: int, out: np.ndarray | None = None) -> np.ndarray:
        return self.select(self.idx[k], number, out=out)

    def select(self, block: np.ndarray, number: int, out: np.ndarray | None = None) -> np.ndarray:
        """Boolean: which voxels of ``block`` (a piece of ``idx``) belong to segment ``number``."""
        vals = self.values(number)
        m = np.equal(block, vals[0], out=out)
        for v in vals[1:]:
            m |= block == v
        return m


def _frame_boxes(idx: np.ndarray) -> np.ndarray:
    """Per frame (row start, stop, column start, stop) of its labelled voxels (idx > 1); 0,0,0,0 if none.

    Why: the body fills a fraction of a 512x512 frame, so counting and masking inside the box is
    several times cheaper than over whole frames.
    """
    labelled = idx > 1
    rows, cols = labelled.any(axis=2), labelled.any(axis=1)
    nj, ni = idx.shape[1], idx.shape[2]
    box = np.stack([rows.argmax(axis=1), nj - rows[:, ::-1].argmax(axis=1),
                    cols.argmax(axis=1), ni - cols[:, ::-1].argmax(axis=1)], axis=1)
    box[~rows.any(axis=1)] = 0
    return box


def _frame_counts(idx: np.ndarray, box: np.ndarray, nbins: int) -> np.ndarray:
    return np.stack([np.bincount(idx[k, j0:j1, i0:i1].ravel(), minlength=nbins)[:nbins]
                     for k, (j0, j1, i0, i1) in enumerate(box)])


def make_plan(labels: Volume, volumes: VolumeRecord, ct: Volume | None = None,
              rules: ReportingRules = RULES) -> SegmentPlan:
    """Which segments exist (found structure x side) and the per-voxel index they are read from.

    Sides use the mid-sagittal plane of :mod:`seg.measure` (left = +x in LPS): the plane recorded in
    ``qa.midline_x_mm`` when its split reproduces volumes.json's left volumes exactly, else the plane
    recomputed by :func:`seg.measure.midline_x`; either way SEG sides equal the reported numbers.
    A structure side below ``rules.min_segment_cm3`` is "not found": no segment (its voxels are
    background in the SEG), and the SR says so.
    """
    n = len(structures())
    if int(labels.array.max(initial=0)) >= min(n, 128):
        raise ValueError(f"label values must be below {n}")
    recorded = volumes.qa.midline_x_mm
    mid = float(recorded) if recorded is not None else midline_x(labels, ct)[0]
    idx = _side_index(labels, mid)
    frame_box = _frame_boxes(idx)
    frame_counts = _frame_counts(idx, frame_box, 2 * n)
    counts = frame_counts.sum(axis=0)
    if recorded is not None and not _matches(counts, volumes, labels.voxel_volume_cm3):
        idx = _side_index(labels, midline_x(labels, ct)[0])
        frame_counts = _frame_counts(idx, frame_box, 2 * n)
        counts = frame_counts.sum(axis=0)
    by_label = volumes.by_label()
    segments: list[SegmentInfo] = []
    lut = np.zeros(2 * n, dtype=np.uint16)

    def add(s: Structure, side: str, *values: int) -> None:
        segments.append(SegmentInfo(len(segments) + 1, s.label, s.name, side))
        lut[list(values)] = segments[-1].number

    vox = labels.voxel_volume_cm3
    for s in structures()[1:]:
        n_right, n_left = int(counts[2 * s.label]), int(counts[2 * s.label + 1])
        entry = by_label.get(s.label)
        split = entry is None or entry.split
        if not split:
            if is_found((n_left + n_right) * vox, rules):
                add(s, "both", 2 * s.label, 2 * s.label + 1)
            continue
        if n_left and is_found(n_left * vox, rules):
            add(s, "left", 2 * s.label + 1)
        if n_right and is_found(n_right * vox, rules):
            add(s, "right", 2 * s.label)
    return SegmentPlan(segments, idx, lut, frame_box, frame_counts)


def plan_segments(labels: Volume, volumes: VolumeRecord, ct: Volume | None = None,
                  rules: ReportingRules = RULES) -> tuple[list[SegmentInfo], np.ndarray]:
    """Segment list and the segment-number map in frame layout (k, j, i) (see :func:`make_plan`)."""
    plan = make_plan(labels, volumes, ct, rules)
    return plan.segments, plan.seg_map()


def segment_label(info: SegmentInfo) -> str:
    s = structures()[info.label]
    return s.display_name if info.side == "both" else f"{s.display_name} {info.side}"


def _segment_description(info: SegmentInfo, subject: str,
                         model_info: ModelInfo) -> hd.seg.SegmentDescription:
    s = structures()[info.label]
    desc = hd.seg.SegmentDescription(
        segment_number=info.number,
        segment_label=segment_label(info)[:64],
        segmented_property_category=codes.ANATOMICAL_STRUCTURE,
        segmented_property_type=codes.structure_code(s),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(model_info),
        tracking_uid=tracking_uid(subject, s.name, info.side),
        tracking_id=tracking_label(s.name, info.side),
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
    return read_source_headers(ct.source_files, ct.spacing_mm[2])


@dataclass
class BuiltSeg:
    """A SEG and which slices its frames come from (the SR takes it from here; None when unknown:
    a BINARY or FRACTIONAL SEG that plain highdicom built).

    ``header`` may still lack the frames (their per-frame functional groups and pixel data) when the
    build deferred them (``build_seg_frames(defer_frames=True)``); every other attribute is the whole
    SEG's, and the measurement SR needs no more. :attr:`dataset` splices the frames in (once).
    """

    header: Dataset
    frames: SegFrames | None
    _fill: Callable[[], None] | None = None

    @property
    def dataset(self) -> Dataset:
        """The whole SEG (its frames encoded now if they were deferred)."""
        if self._fill is not None:
            fill, self._fill = self._fill, None
            fill()
        return self.header


def _labelmap_frames(seg: Dataset, plan: SegmentPlan, sources: list[Dataset]) -> SegFrames:
    """Which slices each segment's frames come from in a LABELMAP SEG (a frame holds every segment on
    its slice): the slices in the SEG's frame order, each kept for the segments present on it."""
    k_of = {str(src.SOPInstanceUID): k for k, src in enumerate(sources)}
    order = [k_of[str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
             for f in seg.PerFrameFunctionalGroupsSequence]
    present = plan.present()
    return SegFrames(plan, {s.number: [k for k in order if present[k, s.number]] for s in plan.segments},
                     sources)


def build_seg_frames(ct: Volume, labels: Volume, volumes: VolumeRecord, model_info: ModelInfo,
                     seg_type: str = "BINARY", compression: str = "RLE", sources: list[Dataset] | None = None,
                     fast: bool = True, rules: ReportingRules = RULES,
                     defer_frames: bool = False) -> BuiltSeg:
    """The SEG dataset (``compression`` applies to LABELMAP only; BINARY stays uncompressed, FRACTIONAL
    is RLE: the lossless codec every viewer decodes; its pixels are 0 or 255, occupancy 0 or 1).

    ``fast`` splices BINARY and FRACTIONAL frames in as bytes (:mod:`reporting.seg_splice`, only on a
    highdicom it was checked against); False = plain highdicom.
    Structures below ``rules.min_segment_cm3`` per side get no segment (see :func:`make_plan`).
    ``defer_frames`` leaves the spliced frames' encoding to :attr:`BuiltSeg.dataset` (see there).
    """
    if labels.shape != ct.shape:
        raise ValueError(f"label map {labels.shape} is not on the CT grid {ct.shape}")
    seg_type = seg_type.upper()
    if seg_type not in SEG_TYPES:
        raise ValueError(f"seg_type must be one of {', '.join(SEG_TYPES)}, not {seg_type!r}")
    sources = sources if sources is not None else read_sources(ct)
    if len(sources) != ct.shape[2]:
        raise ValueError(f"{len(sources)} source files for {ct.shape[2]} slices")
    src0 = sources[0]
    subject = tracking_subject(src0, ct.header)
    plan = make_plan(labels, volumes, ct, rules)
    if not plan.segments:
        raise ValueError("no structure of at least the minimum segment size in the label map: "
                         "nothing to put in a SEG")
    transfer_syntax = _transfer_syntax(seg_type, compression)
    series_uid = ct.header.series_instance_uid or str(src0.SeriesInstanceUID)
    content = source_content(series_uid, ct.source_sop_uids or [str(s.SOPInstanceUID) for s in sources])
    uid = _OutputUids(content, model_info, f"SEG-{seg_type}")
    construct = _seg_factory(sources, seg_type, transfer_syntax, uid, model_info)
    descriptions = [_segment_description(s, subject, model_info) for s in plan.segments]
    seg, frames, fill = _splice_or_plain(construct, plan, descriptions, sources, seg_type, fast)
    _finish(seg, uid, model_info, src0, ct.header)
    built = BuiltSeg(seg, frames, fill)
    if not defer_frames:
        _ = built.dataset  # the frames spliced in now
    return built


def _transfer_syntax(seg_type: str, compression: str) -> UID:
    """BINARY uncompressed, FRACTIONAL RLE, LABELMAP as ``compression`` asks (RLE or JPEGLS)."""
    if seg_type == "BINARY":
        return ExplicitVRLittleEndian
    if seg_type == "FRACTIONAL":
        return RLELossless
    transfer_syntax = _COMPRESSION.get(str(compression).upper(), None)
    if transfer_syntax is None:
        raise ValueError(f"unknown LABELMAP compression {compression!r} (RLE or JPEGLS)")
    return transfer_syntax


@dataclass(frozen=True)
class _OutputUids:
    """The SEG's UIDs, derived from its source content, model and kind: a rerun gives the same ones."""

    content: str
    model_info: ModelInfo
    kind: str  # SEG-<type>

    def __call__(self, what: str) -> str:
        return output_uid(self.content, self.model_info, f"{self.kind}/{what}")


def _seg_factory(sources: list[Dataset], seg_type: str, transfer_syntax: UID, uid: _OutputUids,
                 model_info: ModelInfo) -> Callable[[np.ndarray, list], hd.seg.Segmentation]:
    """highdicom's Segmentation for given pixels and segment descriptions, every other argument fixed
    (the byte splice calls it on a small stand-in, the plain path on the whole map)."""
    description = ("Thigh muscle segmentation" + (" (DEMO model)" if model_info.demo else ""))[:64]

    def construct(pixels: np.ndarray, descs: list) -> hd.seg.Segmentation:
        return hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=seg_type,
            segment_descriptions=descs,
            series_instance_uid=uid("series"),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=uid("instance"),
            instance_number=1,
            manufacturer="dicomnode",
            manufacturer_model_name=(model_info.name or "unknown-model")[:64],
            software_versions=(model_info.version or "0")[:64],
            device_serial_number="0",
            content_description=description,
            content_label="THIGH_MUSCLES",
            content_creator_name="dicomnode^automatic",
            transfer_syntax_uid=transfer_syntax,
            omit_empty_frames=True,
            workers=0,  # no worker processes: frames are encoded in this one
            **({"fractional_type": "OCCUPANCY"} if seg_type == "FRACTIONAL" else {}),
        )

    return construct


def _splice_or_plain(construct: Callable[[np.ndarray, list], hd.seg.Segmentation], plan: SegmentPlan,
                     descriptions: list, sources: list[Dataset], seg_type: str,
                     fast: bool) -> tuple[Dataset, SegFrames | None, Callable[[], None] | None]:
    """The SEG with its frames spliced in as bytes where that is checked and applies, else built by
    plain highdicom; with the slices of each segment's frames (None where plain highdicom does not
    say) and the deferred frame encoding (None when there is none)."""
    if seg_type in seg_splice.SPLICE_TYPES and fast and not seg_splice.splice_supported():
        log.info("SEG byte splice not checked against highdicom %s; using highdicom per frame",
                 hd.__version__)
    elif seg_type in seg_splice.SPLICE_TYPES and fast:
        try:
            seg, slices, fill = seg_splice.splice(construct, plan, descriptions, sources, seg_type)
            return seg, SegFrames(plan, {s.number: ks for s, ks in zip(plan.segments, slices, strict=True)},
                                  sources), fill
        except seg_splice.FastPathUnavailable as exc:
            log.warning("SEG byte splice not applicable (%s); using highdicom per frame", exc)
    seg = construct(plan.seg_map(), descriptions)  # (frames, rows, columns) = (k, j, i)
    # LABELMAP: one frame per slice, its few frame headers give the order
    frames = _labelmap_frames(seg, plan, sources) if seg_type == "LABELMAP" else None
    return seg, frames, None


def _finish(seg: Dataset, uid: _OutputUids, model_info: ModelInfo, src0: Dataset,
            ct_header: SeriesHeader) -> None:
    """What highdicom does not set: our dimension organisation UID, the series description, the
    patient and study identity of the source, the series date, the coding schemes used."""
    dim_uid = uid("dimension-organization")
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dim_uid
    seg.SeriesDescription = series_description("Thigh muscles SEG", model_info)
    copy_identity(seg, src0, ct_header)
    date_series(seg)
    codes.declare_schemes(seg)
