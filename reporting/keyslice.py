"""Where each SEG segment is widest: the CT slice of its largest cross-section and that section's outline.

Why: a TID 1500 reader places a measurement on the images through spatial coordinates, and OHIF
3.13 refuses a report whose measurement groups have none (docs/upstream.md §6). A volume from a
SEG has no coordinates of its own; the outline of the segment's largest cross-section is a real
region of that segment on a real source image, and its area (the maximal anatomical
cross-sectional area, a common muscle figure) is a measurement inferred from it. Read from the
SEG alone (its frames, their source images and pixel spacing), like the SR's image references.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from scipy import ndimage


@dataclass(frozen=True)
class Section:
    """One segment's largest cross-section: its CT image, its outline and the area it encloses."""

    sop_class_uid: str
    sop_instance_uid: str
    outline: np.ndarray  # (N, 2) (column, row) at pixel corners, closed: first point == last point
    area_cm2: float


def outline(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The boundary of the largest 4-connected region of ``mask`` (holes filled), and its pixel count.

    The boundary runs along pixel edges, so it encloses exactly those pixels: vertices are pixel
    corners in (column, row), the image's top-left corner being (0, 0) as in an SR SCOORD. With the
    holes filled (4-connected background) no corner is shared by two stretches of the boundary, so
    every corner has one way on and the walk is a single loop; straight runs keep their end points.
    Found inside the mask's bounding box (the same components, holes and loop: everything around the
    box is background), the points then moved to the whole image.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        raise ValueError("empty mask: no outline")
    points, pixels = _outline(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    return points + (cols[0], rows[0]), pixels


def _outline(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """:func:`outline` of a mask that fills its bounding box."""
    labels, _ = ndimage.label(mask)
    region = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:])))
    p = np.pad(region, 1)
    inside = p[1:-1, 1:-1]
    nxt: dict[tuple[int, int], tuple[int, int]] = {}
    # clockwise on screen (rows grow downwards): top, right, bottom and left sides facing outside
    for exposed, (x0, y0), (x1, y1) in (
            (~p[:-2, 1:-1], (0, 0), (1, 0)), (~p[1:-1, 2:], (1, 0), (1, 1)),
            (~p[2:, 1:-1], (1, 1), (0, 1)), (~p[1:-1, :-2], (0, 1), (0, 0))):
        for r, c in zip(*np.nonzero(inside & exposed), strict=True):
            nxt[(int(c) + x0, int(r) + y0)] = (int(c) + x1, int(r) + y1)
    start = min(nxt, key=lambda v: (v[1], v[0]))
    loop = [start]
    while (v := nxt[loop[-1]]) != start:
        loop.append(v)
    pts = np.array(loop + [start], dtype=float)
    d = np.diff(pts, axis=0)
    turns = np.any(d[1:] != d[:-1], axis=1)  # corners where the direction changes
    keep = np.r_[True, turns, True]
    return pts[keep], int(region.sum())


def pixel_spacing(seg: Dataset) -> tuple[float, float]:
    shared = seg.get("SharedFunctionalGroupsSequence")
    measures = shared[0].get("PixelMeasuresSequence") if shared else None
    if not measures:
        raise ValueError("SEG without shared Pixel Measures: no pixel spacing for the cross-sections")
    row, col = (float(v) for v in measures[0].PixelSpacing)
    return row, col


def _frame_pixels(seg: Dataset) -> Iterator[np.ndarray]:
    """The SEG's frames, one at a time. 1-bit frames are unpacked here: pydicom 3.0 cannot split
    native BINARY frames whose size is not whole bytes (e.g. 85 × 107 pixels)."""
    meta = getattr(seg, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if int(seg.BitsAllocated) != 1 or (syntax is not None and syntax.is_encapsulated):
        yield from iter_pixels(seg)
        return
    rows, cols = int(seg.Rows), int(seg.Columns)
    n = rows * cols
    packed = np.frombuffer(seg.PixelData, dtype=np.uint8)
    for frame in range(int(seg.get("NumberOfFrames", 1))):
        first = frame * n  # bits are packed least significant first (PS3.5 §8.1.1)
        bits = np.unpackbits(packed[first // 8:(first + n + 7) // 8 + 1], bitorder="little")
        yield bits[first % 8:first % 8 + n].reshape(rows, cols)


def largest_sections(seg: Dataset, frames: Sequence[Dataset]) -> dict[int, Section]:
    """Per segment number, its cross-section with the most pixels (the first such frame on a tie).

    ``frames``: the SEG's per-frame functional groups. Each frame is decoded once; a BINARY or
    FRACTIONAL frame holds the segment named in its header, a LABELMAP frame every value in it.
    """
    best: dict[int, tuple[int, int, np.ndarray]] = {}  # number -> (pixels, frame, mask)
    for index, (frame, px) in enumerate(zip(frames, _frame_pixels(seg), strict=True)):
        if "SegmentIdentificationSequence" in frame:
            number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            counts = {number: int(np.count_nonzero(px))}
        else:
            bins = np.bincount(px.ravel().astype(np.int64))
            counts = {int(v): int(bins[v]) for v in np.flatnonzero(bins) if v}
        for number, count in counts.items():
            if count and count > best.get(number, (0, 0, None))[0]:
                mask = px > 0 if "SegmentIdentificationSequence" in frame else px == number
                best[number] = (count, index, mask)
    row_mm, col_mm = pixel_spacing(seg)
    out = {}
    for number, (_, index, mask) in sorted(best.items()):
        source = frames[index].DerivationImageSequence[0].SourceImageSequence[0]
        points, pixels = outline(mask)
        out[number] = Section(str(source.ReferencedSOPClassUID), str(source.ReferencedSOPInstanceUID),
                              points, pixels * row_mm * col_mm / 100.0)
    return out
