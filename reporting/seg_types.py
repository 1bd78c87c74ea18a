"""The SEG encodings the node can write, named once.

Why a module of its own: the configuration checks ``[output] seg_type`` against them without
importing highdicom, and :func:`reporting.seg.build_seg_frames` against the same names.
"""

from __future__ import annotations

from typing import Literal, get_args

SegTypeName = Literal["FRACTIONAL", "BINARY", "LABELMAP"]
SEG_TYPES: tuple[SegTypeName, ...] = get_args(SegTypeName)
