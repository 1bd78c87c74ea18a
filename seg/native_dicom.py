"""Read plain native little-endian image instances without pydicom's per-element machinery.

Why: loading a 400-slice CT spent most of its time in pydicom's reader (a generator step, a
``RawDataElement`` and a dictionary entry for every element of every file) and in its pixel backend
(decoder lookup, runner, options and validation per slice). For the common file (a Part 10 preamble,
explicit VR little-endian file meta, an Explicit or Implicit VR Little Endian data set of defined
lengths) this module walks the elements itself and keeps only the ones the loader asks for, as
pydicom ``RawDataElement`` objects in a pydicom ``Dataset``: every value is still converted by pydicom,
on access, exactly as after ``dcmread``; sequences it steps over as pydicom parses them. Anything
else (no preamble, deflate, big endian, encapsulated pixels, other undefined lengths, unknown VRs, a
value cut short) gets ``None``, and the caller reads that file with pydicom, so its results and its
errors stay pydicom's.

:func:`native_frame` reads the stored pixels straight from a native Pixel Data value with the dtype,
shape and unused-bits correction of pydicom's ``pixel_array``, or says ``None`` where pydicom decodes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
_SYNTAXES = {IMPLICIT_VR_LE.encode(): True, EXPLICIT_VR_LE.encode(): False}  # UID -> implicit VR
TRANSFER_SYNTAX_TAG = 0x00020010
PIXEL_DATA_TAG = 0x7FE00010

# pydicom's explicit VRs (valuerep.STANDARD_VR) by the size of their length field.
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_VR_NAMES = {vr: vr.decode() for vr in _SHORT_VRS | _LONG_VRS}
_UNDEFINED = 0xFFFFFFFF
_ITEM_DELIMITER = b"\xfe\xff\x0d\xe0"  # (FFFE,E00D), little endian

_TAG = struct.Struct("<HH")
_IMPLICIT = struct.Struct("<HHL")
_SHORT_LEN = struct.Struct("<H")
_LONG_LEN = struct.Struct("<L")


def _explicit_header(data: bytes, pos: int, end: int) -> tuple[int, str, int, int] | None:
    """(tag, VR, length, value offset) of an explicit VR element, or None where pydicom must look."""
    if end - pos < 8:
        return None
    group, elem = _TAG.unpack_from(data, pos)
    vr = data[pos + 4:pos + 6]
    if vr in _SHORT_VRS:
        return group << 16 | elem, _VR_NAMES[vr], _SHORT_LEN.unpack_from(data, pos + 6)[0], pos + 8
    if vr in _LONG_VRS and end - pos >= 12:
        return group << 16 | elem, _VR_NAMES[vr], _LONG_LEN.unpack_from(data, pos + 8)[0], pos + 12
    return None


def _element(data: bytes, pos: int, end: int, implicit: bool) -> tuple[int, str | None, int, int] | None:
    """(tag, VR or None when implicit, length, value offset) of the element at ``pos``, or None."""
    if not implicit:
        return _explicit_header(data, pos, end)
    if end - pos < 8:
        return None
    group, elem, length = _IMPLICIT.unpack_from(data, pos)
    return group << 16 | elem, None, length, pos + 8


def _is_sequence(tag: int, vr: str | None) -> bool:
    """Does pydicom read this undefined-length element as a sequence of items? (Other undefined
    lengths it scans for a delimiter's bytes: left to it.)"""
    if vr is not None:
        return vr == "SQ"
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:  # private or unknown: pydicom looks ahead
        return False


def _skip_elements(data: bytes, pos: int, stop: int | None, implicit: bool, depth: int) -> int | None:
    """Where an item's elements from ``pos`` end: exactly at ``stop`` (a defined-length item), or
    after its Item Delimitation Item (``stop`` None, an undefined-length item); None where anything
    does not fit, so that the file is left to pydicom."""
    undefined_item = stop is None
    stop = len(data) if stop is None else stop
    while pos < stop:
        if undefined_item and data[pos:pos + 4] == _ITEM_DELIMITER:
            return pos + 8
        head = _element(data, pos, stop, implicit)
        if head is None:
            return None
        tag, vr, length, start = head
        if tag >> 16 == 0xFFFE:
            return None
        if length == _UNDEFINED:
            if not _is_sequence(tag, vr):
                return None
            pos = _skip_sequence(data, start, implicit, depth + 1)
            if pos is None:
                return None
        elif start + length > stop:
            return None
        else:
            pos = start + length
    return None if undefined_item or pos != stop else pos


def _skip_sequence(data: bytes, pos: int, implicit: bool, depth: int) -> int | None:
    """Where the items of an undefined-length sequence starting at ``pos`` end (after its Sequence
    Delimitation Item), walking each item's elements as pydicom reads them; None if malformed."""
    end = len(data)
    if depth > 32:
        return None
    while end - pos >= 8:
        group, elem, length = _IMPLICIT.unpack_from(data, pos)  # items have no VR in either encoding
        tag, pos = group << 16 | elem, pos + 8
        if tag == 0xFFFEE0DD:
            return pos
        if tag != 0xFFFEE000:
            return None
        if length == _UNDEFINED:
            pos = _skip_elements(data, pos, None, implicit, depth)
        elif pos + length <= end:
            pos = _skip_elements(data, pos, pos + length, implicit, depth) if length else pos
        else:
            return None
        if pos is None:
            return None
    return None


def read_file_header(path: str | os.PathLike, wanted: Collection[int]) -> Dataset | None:
    """:func:`read_header` of a file; None (the caller reads it with pydicom) for anything but a plain
    Part 10 file. Only a file with the Part 10 prefix is read whole."""
    with open(path, "rb") as fp:
        head = fp.read(132)
        return read_header(head + fp.read(), wanted) if head[128:132] == b"DICM" else None


def read_header(data: bytes, wanted: Collection[int]) -> Dataset | None:
    """The elements of ``wanted`` (top level; Specific Character Set always) of one Part 10 file's
    bytes, with ``file_meta`` holding its Transfer Syntax UID; None for anything but the plain case.

    The Pixel Data value, if wanted, is a zero-copy ``memoryview`` of ``data``.
    """
    end = len(data)
    if end < 132 or data[128:132] != b"DICM":
        return None
    pos, syntax = 132, None
    while end - pos >= 2 and _SHORT_LEN.unpack_from(data, pos)[0] == 2:  # file meta: explicit VR LE
        head = _explicit_header(data, pos, end)
        if head is None:
            return None
        tag, _, length, start = head
        if length == _UNDEFINED or start + length > end:
            return None
        if tag == TRANSFER_SYNTAX_TAG:
            syntax = data[start:start + length].rstrip(b"\0 ")
        pos = start + length
    implicit = _SYNTAXES.get(syntax) if syntax is not None else None
    if implicit is None or end - pos < 8:
        return None
    # pydicom checks the first element's VR bytes and follows the data where they contradict the
    # syntax; such files are left to it.
    looks_explicit = all(0x40 < b < 0x5B for b in data[pos + 4:pos + 6])
    if looks_explicit == implicit:
        return None
    wanted = set(wanted) | {0x00080005}
    elements: dict[int, RawDataElement] = {}
    while pos < end:
        head = _element(data, pos, end, implicit)
        if head is None:
            return None
        tag, vr, length, start = head
        if tag >> 16 in (0x0000, 0x0002, 0xFFFE):
            return None
        if length == _UNDEFINED:  # a sequence pydicom parses item by item: stepped over the same way
            if tag in wanted or not _is_sequence(tag, vr):
                return None
            pos = _skip_sequence(data, start, implicit, 0)
            if pos is None:
                return None
            continue
        if start + length > end:
            return None
        if tag in wanted:
            if tag == PIXEL_DATA_TAG and length:
                value = memoryview(data)[start:start + length]
            else:
                value = data[start:start + length] if length else empty_value_for_VR(vr, raw=True)
            elements[tag] = RawDataElement(BaseTag(tag), vr, length, value, start, implicit, True)
        pos = start + length
    if not elements:
        return None
    ds = Dataset(elements)
    ds.file_meta = FileMetaDataset({TRANSFER_SYNTAX_TAG: RawDataElement(
        BaseTag(TRANSFER_SYNTAX_TAG), "UI", len(syntax), syntax, 0, False, True)})
    return ds


# Raw values whose pydicom conversion is known (trailing padding stripped), read without converting:
# pydicom's element conversion costs more than everything else native_frame does.
_RAW_SYNTAXES = {IMPLICIT_VR_LE.encode(): IMPLICIT_VR_LE, EXPLICIT_VR_LE.encode(): EXPLICIT_VR_LE}
_RAW_MONOCHROME = {f"MONOCHROME{i}{pad}".encode(): f"MONOCHROME{i}" for i in (1, 2) for pad in ("", " ")}


def _value(ds: Dataset, tag: int, vr: str, known: dict[bytes, str]):
    """The element's value: looked up from its raw bytes where they are one of ``known``, else
    pydicom's conversion (KeyError where it is missing)."""
    elem = ds.get_item(tag)
    if type(elem) is RawDataElement and elem.VR in (None, vr) and type(elem.value) is bytes:
        hit = known.get(elem.value)
        if hit is not None:
            return hit
    return ds[tag].value


def _us(ds: Dataset, tag: int):
    """A US value: its two raw little-endian bytes where that is all pydicom's conversion does (one
    value; the dictionary VR is US for every tag read here), else pydicom's conversion."""
    elem = ds.get_item(tag)
    if (type(elem) is RawDataElement and elem.VR in (None, "US") and elem.is_little_endian
            and type(elem.value) is bytes and len(elem.value) == 2):
        return int.from_bytes(elem.value, "little")
    return ds[tag].value


@dataclass(frozen=True)
class NativeFrame:
    """One native monochrome frame as stored: ``stored`` (a possibly read-only view of the file's
    bytes, pydicom's dtype and shape) and how many unused high bits pydicom's correction drops."""

    stored: np.ndarray
    unused_bits: int

    def pixels(self) -> np.ndarray:
        """What pydicom's ``pixel_array`` returns for this frame (dtype, shape, values)."""
        if not self.unused_bits:
            return self.stored
        px = self.stored.copy()
        unused_bits_correction(px, self.unused_bits)
        return px


def native_frame(ds: Dataset) -> NativeFrame | None:
    """The slice's frame read straight from a native little-endian Pixel Data value, as pydicom's
    ``pixel_array`` would read it; None where anything differs from one monochrome frame of 8 or 16
    bits, so that pydicom decodes it (and warns or fails as it does)."""
    try:
        syntax = _value(ds.file_meta, TRANSFER_SYNTAX_TAG, "UI", _RAW_SYNTAXES)
        if syntax is None or str(syntax) not in (IMPLICIT_VR_LE, EXPLICIT_VR_LE):
            return None
        # Float pixel data, an extended offset table, frames: pydicom's own handling.
        if 0x7FE00008 in ds or 0x7FE00009 in ds or 0x7FE00001 in ds:
            return None
        if 0x00280008 in ds and ds[0x00280008].value != 1:
            return None
        spp, pi = _us(ds, 0x00280002), _value(ds, 0x00280004, "CS", _RAW_MONOCHROME)
        rows, cols = _us(ds, 0x00280010), _us(ds, 0x00280011)
        allocated, stored, signed = _us(ds, 0x00280100), _us(ds, 0x00280101), _us(ds, 0x00280103)
        raw = ds.get_item(PIXEL_DATA_TAG).value
    except Exception:  # any header pydicom reads otherwise (or refuses): its decoder's verdict
        return None
    if spp != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    if allocated not in (8, 16) or signed not in (0, 1):
        return None
    if not all(type(v) is int for v in (rows, cols, stored)) or not (0 < rows < 65536 and 0 < cols < 65536):
        return None
    if not 1 <= stored <= allocated or not isinstance(raw, (bytes, bytearray, memoryview)):
        return None
    count = rows * cols
    size = count * allocated // 8
    if len(raw) not in (size, size + size % 2):  # more bytes make pydicom warn and trim: its path
        return None
    px = np.frombuffer(raw, f"<{'ui'[signed]}{allocated // 8}", count=count).reshape(rows, cols)
    return NativeFrame(px, allocated - stored)


def unused_bits_correction(px: np.ndarray, shift: int) -> None:
    """pydicom's correction where Bits Stored < Bits Allocated, in place: the bits above Bits Stored
    are dropped, and a signed value is sign-extended from its top stored bit (arithmetic shift)."""
    np.left_shift(px, shift, out=px)
    np.right_shift(px, shift, out=px)
