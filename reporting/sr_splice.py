"""The measurement SR's image references added after highdicom's constructor, as its content is
encoded once per distinct item.

Why: TID 1411 names every source image of every segment, about 8 600 rows for a 400-slice CT. highdicom's
SR constructor deep-copies the whole content tree and searches it for every image reference (to check
the evidence), and pydicom writes each row element by element: together several seconds. Here the
constructor gets the groups without those rows (each group then names its source series only) and
:func:`encode_content` writes them after each group's Referenced Segment row, where highdicom's
``ReferencedSegment`` writes them, each distinct row encoded once from a template
(:class:`_ImageRows`). The evidence is the same either way: highdicom 0.28 lists every evidence
instance of the study whether the content cites it or not, and checks only that what it cites is
evidence (the SEG's source images are). :func:`encode_content` encodes the content tree as pydicom
does, each distinct item object once, and keeps it as one raw element written verbatim.
Only on the highdicom versions in :data:`SPLICE_HIGHDICOM`; tests/test_reporting_sr.py compares the
written file with plain highdicom's, byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from collections.abc import Sequence as Seq

import highdicom as hd
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.tag import Tag

SPLICE_HIGHDICOM = ("0.28.",)  # highdicom versions whose SR output the splice was checked against
CONTENT_SEQUENCE = Tag(0x0040A730)
_REFERENCED_SEGMENT = "121191"  # DCM "Referenced Segment"
_ITEM = b"\xfe\xff\x00\xe0"


def splice_supported(version: str | None = None) -> bool:
    """Is the SR splice checked against this highdicom (default: the installed one)? Widen only after
    ``tests/test_reporting_sr.py::test_fast_sr_equals_highdicom`` passes on the new one."""
    return (hd.__version__ if version is None else version).startswith(SPLICE_HIGHDICOM)


def construct(build_sr: Callable[[Dataset], Dataset], root: Dataset, evidence: Seq[Dataset]) -> Dataset:
    """``build_sr(root)`` (the caller's highdicom constructor call) with the root's rows set aside, so
    that highdicom neither copies nor searches them; then the rows, after the check highdicom would
    make: every instance the content cites is evidence."""
    rows = root[CONTENT_SEQUENCE]
    cited = _cited(rows.value)
    missing = cited - {str(e.SOPInstanceUID) for e in evidence}
    if missing:
        raise ValueError(f"no evidence for the SOP instances the content cites: {', '.join(sorted(missing))}")
    root[CONTENT_SEQUENCE] = DataElement(CONTENT_SEQUENCE, "SQ", Sequence([]))
    try:
        sr = build_sr(root)
    finally:
        root[CONTENT_SEQUENCE] = rows
    sr[CONTENT_SEQUENCE] = rows
    return sr


def _cited(rows: Seq[Dataset]) -> set[str]:
    """SOP Instance UIDs of the IMAGE and COMPOSITE rows of a content tree (highdicom's evidence rule)."""
    out: set[str] = set()
    for row in rows:
        if row.ValueType in ("IMAGE", "COMPOSITE"):
            out.add(str(row.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        out |= _cited(row.get("ContentSequence", []))
    return out


class _ImageRows:
    """Encoded TID 1411 "Source image for segmentation" rows, per segment number, one encoding per
    distinct (SOP Class UID, SOP Instance UID).

    Why: about 8 600 rows name some 400 CT images. highdicom's row is built and encoded once per pair of
    UID lengths with same-length marker UIDs (a row's bytes differ only in its two UIDs, its lengths
    not at all), then each image's UIDs replace the markers.
    """

    def __init__(self, images: dict[int, list[tuple[str, str]]], encodings: str | list[str]) -> None:
        self.images, self.encodings = images, encodings
        self.templates: dict[tuple[int, int], tuple[str, str, bytes]] = {}
        self.encoded: dict[tuple[str, str], bytes] = {}

    def _row(self, uids: tuple[str, str]) -> bytes:
        if uids not in self.encoded:
            cls, inst = uids
            key = (len(cls), len(inst))
            if key not in self.templates and min(key) >= 3:
                markers = "1." + "7" * (key[0] - 2), "1." + "8" * (key[1] - 2)
                self.templates[key] = (*markers, _item(hd.sr.SourceImageForSegmentation(*markers),
                                                       self.encodings, {}))
            m_cls, m_inst, template = self.templates.get(key, ("", "", b""))
            if m_cls and template.count(m_cls.encode()) == template.count(m_inst.encode()) == 1:
                row = template.replace(m_cls.encode(), cls.encode()).replace(m_inst.encode(), inst.encode())
            else:  # pragma: no cover - UIDs too short for markers: the row itself
                row = _item(hd.sr.SourceImageForSegmentation(cls, inst), self.encodings, {})
            self.encoded[uids] = row
        return self.encoded[uids]

    def of(self, number: int) -> list[bytes]:
        return [self._row(u) for u in self.images.get(number, [])]


def _sequence(elem: DataElement, encodings: str | list[str], cache: dict[int, bytes],
              rows: _ImageRows | None) -> bytes:
    """A sequence's items; in a Content Sequence, the first Referenced Segment row followed by its
    segment's source image rows (where highdicom's ``ReferencedSegment`` puts them)."""
    parts = []
    pending = rows is not None and elem.tag == CONTENT_SEQUENCE
    for ds in elem.value:
        parts.append(_item(ds, encodings, cache, rows))
        if pending and str(ds.ConceptNameCodeSequence[0].get("CodeValue", "")) == _REFERENCED_SEGMENT:
            pending = False
            parts.extend(rows.of(int(ds.ReferencedSOPSequence[0].ReferencedSegmentNumber)))  # type: ignore[union-attr]
    return b"".join(parts)


def _element(elem: DataElement, encodings: str | list[str], cache: dict[int, bytes],
             rows: _ImageRows | None) -> bytes:
    if elem.VR != "SQ":
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, encodings)
        return fp.getvalue()
    value = _sequence(elem, encodings, cache, rows)
    return struct.pack("<HH2sHI", elem.tag.group, elem.tag.element, b"SQ", 0, len(value)) + value


def _item(ds: Dataset, encodings: str | list[str], cache: dict[int, bytes],
          rows: _ImageRows | None = None) -> bytes:
    """One sequence item as pydicom's writer encodes it (explicit VR little endian, defined lengths)."""
    if id(ds) not in cache:
        own = ds.get("SpecificCharacterSet", encodings)
        body = b"".join(_element(ds[t], own, cache, rows) for t in sorted(ds.keys())
                        if not (t.element == 0 and t.group > 6))
        cache[id(ds)] = _ITEM + struct.pack("<I", len(body)) + body
    return cache[id(ds)]


def encode_content(sr: Dataset, images: dict[int, list[tuple[str, str]]]) -> Dataset:
    """A plain Dataset with ``sr``'s elements, the content tree as one raw element that pydicom writes
    verbatim, with each segment's source images (``images``: per segment number, (SOP Class UID, SOP
    Instance UID) of each, in order) after its Referenced Segment row: the content highdicom's
    ``ReferencedSegment`` with those images writes."""
    encodings = sr.get("SpecificCharacterSet", default_encoding)
    body = _sequence(sr[CONTENT_SEQUENCE], encodings, {}, _ImageRows(images, encodings))
    out = Dataset(sr)
    out.file_meta = sr.file_meta
    out.preamble = sr.preamble
    out[CONTENT_SEQUENCE] = RawDataElement(CONTENT_SEQUENCE, "SQ", len(body), body, 0, False, True, True,
                                           False)
    # written verbatim only when pydicom need not re-encode: declare the dataset explicit VR LE
    out.set_original_encoding(False, True, out._character_set)
    return out
