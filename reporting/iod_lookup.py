"""highdicom's "is this attribute in that IOD?" answered once per question.

Why: highdicom asks it for every source image of a SEG (is the image multi-frame?), and each answer is
a linear walk of the IOD's modules and their attribute lists in the standard's tables: about 0.3 ms,
0.1 s for a 400-slice CT, on the path from inference to the SEG in the PACS. The tables are loaded once
and never change, so the answer depends on its arguments only; :func:`install` keeps each one.
Private to highdicom (``_standard_utils``; guarded in tests/test_iod_lookup.py; the upstream fix is
proposed in docs/upstream.md, 9): on a highdicom without it nothing is installed and every answer is
computed as before.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


def _remembered(lookup: Callable[..., bool]) -> Callable[..., bool]:
    @functools.lru_cache(maxsize=1024)
    def cached(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return lookup(attribute, sop_class_uid, exclude)

    @functools.wraps(lookup)
    def is_attribute_in_iod(attribute: str, sop_class_uid: str,
                            exclude_path_elements: Sequence[str] | None = None) -> bool:
        exclude = None if exclude_path_elements is None else tuple(exclude_path_elements)
        return cached(str(attribute), str(sop_class_uid), exclude)

    is_attribute_in_iod.remembers = lookup  # type: ignore[attr-defined]
    return is_attribute_in_iod


def install() -> bool:
    """Remember highdicom's answers from now on (idempotent); False where highdicom lacks the lookup."""
    try:
        from highdicom import _standard_utils as tables
    except ImportError:  # pragma: no cover - another highdicom
        return False
    lookup: Any = getattr(tables, "is_attribute_in_iod", None)
    if lookup is None:  # pragma: no cover - another highdicom
        log.debug("highdicom has no is_attribute_in_iod: IOD lookups not remembered")
        return False
    if not hasattr(lookup, "remembers"):
        tables.is_attribute_in_iod = _remembered(lookup)
    return True
