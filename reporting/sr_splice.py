"""The measurement SR's content kept out of highdicom's constructor and encoded once per distinct item.

Why: highdicom's SR constructor deep-copies the whole content tree and searches it row by row for
image references (to check the evidence), building a content item and a coded concept per row only
to compare value types; pydicom then writes each row element by element, even where one row object
appears in many groups (algorithm, finding site). Here the constructor gets the report root without
its rows, the rows are put back after the same evidence check (every instance the content cites is
evidence), and :func:`encode_content` encodes the content tree as pydicom does, each distinct item
object once, kept as one raw element written verbatim. Only on the highdicom versions in
:data:`SPLICE_HIGHDICOM`; tests/test_reporting_sr.py compares the written file with plain
highdicom's, byte for byte.
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


def _sequence(elem: DataElement, encodings: str | list[str], cache: dict[int, bytes]) -> bytes:
    return b"".join(_item(ds, encodings, cache) for ds in elem.value)


def _element(elem: DataElement, encodings: str | list[str], cache: dict[int, bytes]) -> bytes:
    if elem.VR != "SQ":
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, encodings)
        return fp.getvalue()
    value = _sequence(elem, encodings, cache)
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
    """A plain Dataset with ``sr``'s elements, the content tree as one raw element that pydicom writes
    verbatim: the bytes pydicom would write for it."""
    encodings = sr.get("SpecificCharacterSet", default_encoding)
    body = _sequence(sr[CONTENT_SEQUENCE], encodings, {})
    out = Dataset(sr)
    out.file_meta = sr.file_meta
    out.preamble = sr.preamble
    out[CONTENT_SEQUENCE] = RawDataElement(CONTENT_SEQUENCE, "SQ", len(body), body, 0, False, True, True,
                                           False)
    # written verbatim only when pydicom need not re-encode: declare the dataset explicit VR LE
    out.set_original_encoding(False, True, out._character_set)
    return out
