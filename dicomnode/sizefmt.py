"""Byte counts and percentages as people read them: one format for the disk refusal's reason (the
C-STORE comment and the log), ``dicomnode status`` and the operations page.

Why: the same volume read "1000 MB free < min_free_disk_mb 2048" in the refusal, "12.3 GB" and
"min 2048 MB" on the page, and "95.5% used" beside "95.5 %".
"""

from __future__ import annotations

from dicomnode.config import MB

UNITS = ("B", "kB", "MB", "GB", "TB", "PB")  # decimal, as the MB of the *_mb settings (and df -H)


def size_text(n_bytes: float) -> str:
    """``2.05 GB``, ``512 GB``, ``45.6 MB``, ``999 B``: three significant digits in decimal units, so
    a threshold of 2048 MB and 2000 MB free do not both read "2.0 GB"."""
    n, unit = float(n_bytes), UNITS[0]
    for unit in UNITS:
        if abs(n) < 999.5 or unit == UNITS[-1]:
            break
        n /= 1000
    if unit == "B":
        return f"{n:.0f} B"
    return f"{n:.{2 if abs(n) < 9.995 else 1 if abs(n) < 99.95 else 0}f} {unit}"


def mb_text(mb: float) -> str:
    """A ``*_mb`` setting's value in the same format (``min_free_disk_mb = 2048`` is ``2.05 GB``)."""
    return size_text(mb * MB)


def percent_text(pct: float) -> str:
    """``95.5 %``: one decimal, a space before the sign, as every percentage the node prints."""
    return f"{pct:.1f} %"
