"""Job times and series UIDs as people read them: one format for the CLI's job table and the
operations page."""

from __future__ import annotations

import time


def local_time(t: float | None) -> str:
    """``2026-12-02 08:14:40`` in the node's local time; "" when unknown."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def duration(a: float | None, b: float | None) -> str:
    """From ``a`` to ``b`` in seconds, or minutes from two minutes on; "" when either is unknown."""
    if not a or not b:
        return ""
    s = max(0.0, b - a)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


SHORT_UID_CHARS = 15  # a shortened UID: an ellipsis and its last 14 characters (they tell series apart)


def short_uid(uid: str) -> str:
    """``…`` and the UID's tail when it is longer than :data:`SHORT_UID_CHARS`, else the UID."""
    return "…" + uid[1 - SHORT_UID_CHARS:] if len(uid) > SHORT_UID_CHARS else uid
