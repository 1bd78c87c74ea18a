"""Which CT slices each segment's SEG frames come from, known when the SEG is built.

Why: the measurement SR outlines each segment's largest cross-section (:mod:`reporting.keyslice`).
Read back from the SEG that means parsing thousands of per-frame items and decoding every frame
(seconds for a 400-slice CT); the spliced SEG (:mod:`reporting.seg_splice`) already knows it, from
the label map it was built from. :func:`reporting.sr.key_sections` reads the same from any SEG;
tests/test_reporting_sr.py checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from reporting.keyslice import Section, outline

if TYPE_CHECKING:
    from reporting.seg import SegmentPlan


@dataclass(frozen=True)
class SegFrames:
    """Per segment number, the slices k of its frames in frame order, with the plan they come from."""

    plan: SegmentPlan
    slices: dict[int, list[int]]
    sources: list[Dataset]  # source CT headers in k order

    def largest_sections(self, pixel_spacing: tuple[float, float]) -> dict[int, Section]:
        """Per segment number, its frame with the most pixels (the first in frame order on a tie),
        as :func:`reporting.keyslice.largest_sections` finds it from the decoded frames."""
        row_mm, col_mm = pixel_spacing
        out = {}
        for n, ks in sorted(self.slices.items()):
            counts = self.plan.frame_counts[np.asarray(ks)][:, self.plan.values(n)].sum(axis=1)
            k = ks[int(np.argmax(counts))]
            points, pixels = outline(self.plan.mask(n, k))
            src = self.sources[k]
            out[n] = Section(str(src.SOPClassUID), str(src.SOPInstanceUID), points,
                             pixels * row_mm * col_mm / 100.0)
        return out
