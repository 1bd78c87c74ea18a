"""Byte splice for BINARY and FRACTIONAL SEGs: highdicom's output, without one Dataset per frame.

Why: highdicom builds one pydicom Dataset per frame and pydicom encodes them one element at a time:
~5 ms per frame, i.e. about a minute for a 600-slice CT with 58 segments (12 000 frames), and several
seconds for the default FRACTIONAL SEG of a 400-slice CT (8 600 frames, built and then written).
Here highdicom builds a two-segment skeleton (all shared attributes, a few real frames) and the
per-frame items are encoded once per slice / per segment and concatenated as bytes, kept as one raw
element that pydicom writes verbatim. The pixels are packed (BINARY) or RLE-encoded (FRACTIONAL,
:mod:`reporting.rle_encoder`) inside each segment's bounding box. The skeleton's own frames, items and
pixels, are encoded the same way and must match highdicom's byte for byte, else :func:`splice` raises
:class:`FastPathUnavailable` and the caller uses plain highdicom. Only on the highdicom versions in
:data:`SPLICE_HIGHDICOM`; tests/test_reporting_seg.py compares whole files with plain highdicom's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from copy import deepcopy
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.tag import Tag

from reporting import rle_encoder

if TYPE_CHECKING:
    from reporting.seg import SegmentPlan

_ITEM = b"\xfe\xff\x00\xe0"  # item tag; pydicom writes defined lengths, and so does the splice
_PFFG = 0x52009230
SPLICE_TYPES = ("BINARY", "FRACTIONAL")
SPLICE_HIGHDICOM = ("0.28.",)  # highdicom versions whose output the byte splice was checked against


def splice_supported(version: str | None = None) -> bool:
    """Is the splice checked against this highdicom (default: the installed one)? Elsewhere
    :func:`reporting.seg.build_seg_frames` uses plain highdicom: slower, never different. Widen only after
    ``tests/test_reporting_seg.py::test_fast_encoder_equals_highdicom`` passes on the new one."""
    return (hd.__version__ if version is None else version).startswith(SPLICE_HIGHDICOM)


class FastPathUnavailable(Exception):
    """The skeleton did not match the splice's assumptions; use plain highdicom."""


def _encode_elem(elem: DataElement) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem)
    return fp.getvalue()


def _item(body: bytes) -> bytes:
    return _ITEM + struct.pack("<I", len(body)) + body


def _encode_item(item: Dataset) -> bytes:
    return _item(b"".join(_encode_elem(item[t]) for t in sorted(item.keys())))


def _marker_uid(length: int, digit: str) -> str:
    """A syntactically valid UID of exactly ``length`` characters made of one repeated digit."""
    if length < 3:
        raise FastPathUnavailable(f"UID of {length} characters")
    return "1." + digit * (length - 2)


def _replace_once(encoded: bytes, marker: str, value: str) -> bytes:
    """``encoded`` with the one occurrence of ``marker`` replaced by the same-length ``value``."""
    m = marker.encode("ascii")
    if encoded.count(m) != 1:
        raise FastPathUnavailable("marker UID not unique in its encoded template")
    return encoded.replace(m, value.encode("ascii"))


def _slice_distances(sources: list[Dataset]) -> np.ndarray:
    """Distance of each source slice along the plane normal."""
    normal = hd.spatial.get_normal_vector([float(v) for v in sources[0].ImageOrientationPatient])
    pos = np.array([[float(v) for v in s.ImagePositionPatient] for s in sources])
    return pos @ normal


def _ranks(distances: np.ndarray, included: np.ndarray, direction: int) -> np.ndarray:
    """1-based position index of each included slice (0 elsewhere), ascending along ``direction``."""
    ranks = np.zeros(len(distances), dtype=np.int64)
    ks = np.flatnonzero(included)
    order = ks[np.argsort(direction * distances[ks], kind="stable")]
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


class _FrameItems:
    """Encoded per-frame functional group items (derivation, frame content, plane position, segment
    identification) from the skeleton's first item, cached per slice and per segment."""

    def __init__(self, template: Dataset, sources: list[Dataset], ranks: np.ndarray) -> None:
        self.sources, self.ranks = sources, ranks
        self.deriv: dict[int, bytes] = {}
        self.plane: dict[int, bytes] = {}
        self.seg_ident: dict[int, bytes] = {}
        # private copies of the template elements, mutated and encoded immediately (no copy per slice)
        self.deriv_t, self.plane_t = deepcopy(template[0x00089124]), deepcopy(template[0x00209113])
        self.si_t = deepcopy(template[0x0062000A])
        self.ref_t = self.deriv_t.value[0].SourceImageSequence[0]
        # DerivationImageSequence: pydicom writes defined item lengths, so it is encoded once per pair
        # of UID lengths with same-length marker UIDs, then replaced by each slice's own UIDs
        self.deriv_templates: dict[tuple[int, int], bytes] = {}
        # FrameContentSequence: encoded once with marker values, then only its 8 value bytes change
        fc_t = deepcopy(template[0x00209111])
        fc_t.value[0].DimensionIndexValues = [0x7E57A11E, 0x7E57B22E]
        fc_bytes = _encode_elem(fc_t)
        marker = struct.pack("<II", 0x7E57A11E, 0x7E57B22E)
        if fc_bytes.count(marker) != 1:
            raise FastPathUnavailable("frame content sequence not patchable")
        self.fc_head, self.fc_tail = fc_bytes.split(marker)

    def _deriv(self, k: int) -> bytes:
        if k not in self.deriv:
            cls, inst = str(self.sources[k].SOPClassUID), str(self.sources[k].SOPInstanceUID)
            cls_marker, inst_marker = _marker_uid(len(cls), "7"), _marker_uid(len(inst), "8")
            key = (len(cls), len(inst))
            if key not in self.deriv_templates:
                self.ref_t.ReferencedSOPClassUID = cls_marker
                self.ref_t.ReferencedSOPInstanceUID = inst_marker
                self.deriv_templates[key] = _encode_elem(self.deriv_t)
            self.deriv[k] = _replace_once(_replace_once(self.deriv_templates[key], cls_marker, cls),
                                          inst_marker, inst)
        return self.deriv[k]

    def _plane(self, k: int) -> bytes:
        if k not in self.plane:
            self.plane_t.value[0].ImagePositionPatient = self.sources[k].ImagePositionPatient
            self.plane[k] = _encode_elem(self.plane_t)
        return self.plane[k]

    def _segment(self, n: int) -> bytes:
        if n not in self.seg_ident:
            self.si_t.value[0].ReferencedSegmentNumber = n
            self.seg_ident[n] = _encode_elem(self.si_t)
        return self.seg_ident[n]

    def item(self, n: int, k: int) -> bytes:
        return _item(b"".join((self._deriv(k), self.fc_head, struct.pack("<II", n, int(self.ranks[k])),
                               self.fc_tail, self._plane(k), self._segment(n))))


def _rle_frames(plan: SegmentPlan, n: int, ks: list[int], value: int) -> list[bytes]:
    """Segment ``n`` on slices ``ks`` as RLE frames of 0 / ``value`` (whole frames, box encoded)."""
    _, rows, cols = plan.idx.shape
    (j0, j1), (i0, i1) = plan.box(np.asarray(ks, dtype=np.int64))
    within = plan.select(plan.idx[:, j0:j1, i0:i1][ks], n)
    return rle_encoder.encode_masks(within, (j0, i0), (rows, cols), value)


def _check_pixels(skeleton: Dataset, probes: list[tuple[int, int]], plan: SegmentPlan,
                  value: int) -> None:
    """The skeleton's RLE frames (in its frame order) must be exactly what the splice writes."""
    frames = list(generate_frames(skeleton.PixelData, number_of_frames=int(skeleton.NumberOfFrames)))
    ours = [_rle_frames(plan, n, [k], value)[0] for n, k in probes]
    if frames != ours:
        raise FastPathUnavailable("re-encoded skeleton pixels differ from highdicom's")


def splice(build_skeleton: Callable[[np.ndarray, list], Dataset], plan: SegmentPlan, descriptions: list,
           sources: list[Dataset], seg_type: str) -> tuple[Dataset, list[list[int]], Callable[[], None]]:
    """The SEG of ``plan`` as highdicom's skeleton with every header attribute of the whole SEG, the
    slices k of each segment's frames in frame order, and ``fill``, which splices every frame in as
    bytes (its per-frame functional groups and pixel data; the skeleton's own are removed until then).

    Why ``fill`` apart: the header and the frame index are all the measurement SR needs of the SEG, so
    it can be built while the frames are encoded (:mod:`dicomnode.processing.pipeline`).
    ``build_skeleton(pixels, descriptions)`` is the caller's highdicom constructor call (segment
    numbers in frame layout (k, j, i)).
    """
    if seg_type not in SPLICE_TYPES:
        raise FastPathUnavailable(f"no splice for {seg_type}")
    segments = plan.segments
    nk, rows, cols = plan.idx.shape
    present = plan.present()
    if len(segments) < 2:
        raise FastPathUnavailable("a single segment is described in the shared functional groups")
    ks1 = np.flatnonzero(present[:, 1])
    ks2 = np.flatnonzero(present[:, 2])
    probes = sorted({(1, int(ks1[0])), (1, int(ks1[-1])), (2, int(ks2[0])), (2, int(ks2[-1]))})
    if len({k for _, k in probes}) < 2:
        raise FastPathUnavailable("segments 1 and 2 lie on one slice: slice order not observable")
    skel_pixels = np.zeros((nk, rows, cols), dtype=np.uint8)
    for n, k in probes:
        skel_pixels[k][plan.mask(n, k)] = n
    skeleton = build_skeleton(skel_pixels, descriptions[:2])
    pffg = skeleton.PerFrameFunctionalGroupsSequence
    if len(pffg) != len(probes):
        raise FastPathUnavailable("unexpected skeleton frames")
    pointers = [int(d.DimensionIndexPointer) for d in skeleton.DimensionIndexSequence]
    if pointers != [0x0062000B, 0x00200032]:
        raise FastPathUnavailable(f"unexpected dimension index pointers {pointers}")
    template = pffg[0]
    if sorted(int(t) for t in template.keys()) != [0x00089124, 0x00209111, 0x00209113, 0x0062000A]:
        raise FastPathUnavailable(f"unexpected per-frame functional groups {sorted(template.keys())}")
    distances = _slice_distances(sources)
    ranks = np.zeros(nk, dtype=np.int64)
    items = _FrameItems(template, sources, ranks)

    # highdicom indexes positions among the slices that carry frames; find its direction from the
    # skeleton (both directions are tried; exactly one must reproduce its frames byte for byte)
    probe_slices = np.zeros(nk, dtype=bool)
    probe_slices[[k for _, k in probes]] = True
    encoded = [_encode_item(item) for item in pffg]
    direction = 0
    for d in (1, -1):
        ranks[:] = _ranks(distances, probe_slices, d)
        expected = sorted(probes, key=lambda p: (p[0], ranks[p[1]]))
        if [items.item(n, k) for n, k in expected] == encoded:
            direction = d
            break
    if not direction:
        raise FastPathUnavailable("re-encoded skeleton frames differ from highdicom's")
    fractional_value = 0
    if seg_type == "FRACTIONAL":
        fractional_value = int(skeleton.MaximumFractionalValue)
        _check_pixels(skeleton, expected, plan, fractional_value)
    ranks[:] = _ranks(distances, present[:, 1:].any(axis=1), direction)

    frame_slices = [sorted(np.flatnonzero(present[:, info.number]).tolist(), key=lambda k: int(ranks[k]))
                    for info in segments]
    pixel_vr = _native_vr(skeleton)
    del skeleton[0x7FE00010], skeleton[_PFFG]  # the skeleton's frames: the whole SEG's come in ``fill``
    skeleton.SegmentSequence = [d for d in descriptions]
    skeleton.NumberOfFrames = sum(len(ks) for ks in frame_slices)
    # written verbatim only when pydicom need not re-encode: declare the dataset explicit VR LE
    skeleton.set_original_encoding(False, True, skeleton._character_set)

    def fill() -> None:
        body = b"".join(items.item(info.number, k)
                        for info, ks in zip(segments, frame_slices, strict=True) for k in ks)
        if seg_type == "BINARY":
            skeleton.add_new(0x7FE00010, pixel_vr,
                             _binary_pixels(plan, frame_slices, int(skeleton.NumberOfFrames)))
        else:
            skeleton.add_new(0x7FE00010, "OB", encapsulate([  # encapsulated pixel data is OB (PS3.5 A.4)
                f for info, ks in zip(segments, frame_slices, strict=True)
                for f in _rle_frames(plan, info.number, ks, fractional_value)]))
        skeleton[_PFFG] = RawDataElement(Tag(_PFFG), "SQ", len(body), body, 0, False, True, True, False)

    return skeleton, frame_slices, fill


def _native_vr(skeleton: Dataset) -> str:
    vr = skeleton["PixelData"].VR if "PixelData" in skeleton else "OB"
    return vr if vr in ("OB", "OW") else "OB"


def _binary_pixels(plan: SegmentPlan, frame_slices: list[list[int]], n_frames: int) -> bytes:
    """1-bit frames, least significant bit first, one continuous bit stream (PS3.5 §8.1.1).

    Rows start on byte boundaries when columns % 8 == 0: then only each segment's box is packed,
    straight into one zeroed buffer of all frames; otherwise whole-frame masks form one bit stream.
    """
    _, rows, cols = plan.idx.shape
    row_aligned = cols % 8 == 0
    packed = np.zeros((n_frames if row_aligned else 0, rows, cols // 8), dtype=np.uint8)
    masks: list[np.ndarray] = []
    first = 0
    for info, ks in zip(plan.segments, frame_slices, strict=True):
        (j0, j1), (i0, i1) = plan.box(np.asarray(ks, dtype=np.int64))
        if row_aligned:  # widen the box to whole bytes: its bits then pack in place
            i0, i1 = i0 // 8 * 8, min(cols, -(-i1 // 8) * 8)
        within = plan.select(plan.idx[:, j0:j1, i0:i1][ks], info.number)  # labelled voxels lie inside
        if row_aligned:
            packed[first:first + len(ks), j0:j1, i0 // 8:i1 // 8] = np.packbits(within, axis=-1,
                                                                                bitorder="little")
        else:
            frames = np.zeros((len(ks), rows, cols), dtype=bool)
            frames[:, j0:j1, i0:i1] = within
            masks.append(frames.reshape(-1))
        first += len(ks)
    pixel_data = packed.tobytes() if row_aligned else np.packbits(np.concatenate(masks),
                                                                   bitorder="little").tobytes()
    return pixel_data + b"\x00" if len(pixel_data) % 2 else pixel_data
