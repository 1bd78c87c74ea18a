"""The measurement SR's image references added after highdicom's constructor, and its content
encoded once per distinct item.

Why: TID 1411 names every source image of every segment, about 8 600 rows for a 400-slice CT. highdicom's
SR constructor deep-copies the whole content tree and searches it for every image reference (to check
the evidence), and pydicom writes each row element by element: together several seconds. Here the
constructor gets the groups without those rows (each group then names its source series only) and
:func:`insert_source_images` puts them after each group's Referenced Segment row afterwards, where
highdicom's ``ReferencedSegment`` writes them. The evidence is the same either way: highdicom 0.28
lists every evidence instance of the study whether the content cites it or not, and checks only that
what it cites is evidence (the SEG's source images are). :func:`encode_content` then encodes the
content tree as pydicom does, each distinct item object once (the rows of one CT image are one shared
object, :func:`reporting.sr.segment_source_images`), and keeps it as one raw element written verbatim.
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


def insert_source_images(tree: Dataset, images: dict[int, list[Dataset]]) -> int:
    """After each Referenced Segment row of ``tree`` (any depth), that segment's ``images`` rows;
    returns how many Referenced Segment rows got them."""
    done = 0
    for item in tree.get("ContentSequence", []):
        done += insert_source_images(item, images)
    rows = tree.get("ContentSequence")
    if not rows:
        return done
    for i, row in enumerate(rows):
        if str(row.ConceptNameCodeSequence[0].get("CodeValue", "")) != _REFERENCED_SEGMENT:
            continue
        number = int(row.ReferencedSOPSequence[0].ReferencedSegmentNumber)
        if images.get(number):
            # plain Dataset item assignment: highdicom's ContentSequence would check every row again
            tree[CONTENT_SEQUENCE] = DataElement(CONTENT_SEQUENCE, "SQ",
                                                 Sequence([*rows[:i + 1], *images[number], *rows[i + 1:]]))
            done += 1
        break
    return done


def _element(elem: DataElement, encodings: str | list[str], cache: dict[int, bytes]) -> bytes:
    if elem.VR != "SQ":
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, encodings)
        return fp.getvalue()
    value = b"".join(_item(ds, encodings, cache) for ds in elem.value)
    return struct.pack("<HH2sHI", elem.tag.group, elem.tag.element, b"SQ", 0, len(value)) + value


def _item(ds: Dataset, encodings: str | list[str], cache: dict[int, bytes]) -> bytes:
    """One sequence item as pydicom's writer encodes it (explicit VR little endian, defined lengths)."""
    if id(ds) not in cache:
        own = ds.get("SpecificCharacterSet", encodings)
        body = b"".join(_element(ds[t], own, cache) for t in sorted(ds.keys())
                        if not (t.element == 0 and t.group > 6))
        cache[id(ds)] = _ITEM + struct.pack("<I", len(body)) + body
    return cache[id(ds)]


def encode_content(sr: Dataset) -> Dataset:
    """A plain Dataset with ``sr``'s elements (its highdicom content view would not show the rows
    added since), the content tree as one raw element that pydicom writes verbatim."""
    items: Seq[Dataset] = sr[CONTENT_SEQUENCE].value
    encodings = sr.get("SpecificCharacterSet", default_encoding)
    body = b"".join(_item(ds, encodings, {}) for ds in items)
    out = Dataset(sr)
    out.file_meta = sr.file_meta
    out.preamble = sr.preamble
    out[CONTENT_SEQUENCE] = RawDataElement(CONTENT_SEQUENCE, "SQ", len(body), body, 0, False, True, True,
                                           False)
    # written verbatim only when pydicom need not re-encode: declare the dataset explicit VR LE
    out.set_original_encoding(False, True, out._character_set)
    return out
