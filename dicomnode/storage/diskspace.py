"""Disk back-pressure: is the storage volume too full to take another instance?

Why: an instance the node acknowledged must be on disk, and a volume that fills up also stops the
index, the results and the logs. Well before that, the node refuses new associations with a transient
A-ASSOCIATE-RJ (temporary congestion) and C-STOREs with 0xA700, so the PACS keeps the series queued
and retries; once space returns (retention, an operator) it accepts again by itself. MONAI Informatics
Gateway does the same, refusing at 75 % of the disk used.

The volume is low when fewer than ``min_free_disk_mb`` MB are available to the node's user, or more
than ``max_disk_used_pct`` % of it is used (``df``'s figure: used / (used + available)). The answer is
cached for CHECK_INTERVAL_S, so the C-STORE path pays one ``statvfs`` a second, not one per instance.
Entering the low state logs one WARNING, leaving it one INFO; refusals in between are not logged one by one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.config import MB
from dicomnode.logs import event
from dicomnode.sizefmt import mb_text, percent_text, size_text

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True)
class DiskSpace:
    """One reading of the volume: bytes available to an unprivileged user and the percentage used."""

    free_bytes: int
    used_pct: float

    @property
    def free_mb(self) -> float:
        return self.free_bytes / MB


def read_space(result: Any) -> DiskSpace:
    """A :class:`DiskSpace` from an ``os.statvfs`` result (``used_pct`` as ``df`` computes it)."""
    frsize = result.f_frsize or result.f_bsize
    free = result.f_bavail * frsize
    used = (result.f_blocks - result.f_bfree) * frsize
    total = used + free
    return DiskSpace(free_bytes=free, used_pct=100.0 * used / total if total else 0.0)


def judge(space: DiskSpace, min_free_mb: float, max_used_pct: float) -> str | None:
    """Why the volume is low (the refusal's comment), or None: one rule for the receiver's guard and
    the operations page, which shows whether the receiver refuses."""
    if space.free_mb < min_free_mb:
        return f"disk low: {size_text(space.free_bytes)} free < min_free_disk_mb ({mb_text(min_free_mb)})"
    if space.used_pct > max_used_pct:
        used, most = percent_text(space.used_pct), percent_text(max_used_pct)
        return f"disk low: {used} used > max_disk_used_pct ({most})"
    return None


def describe(space: DiskSpace, min_free_mb: float, max_used_pct: float) -> str:
    """One line for ``dicomnode status``: the reading against both thresholds, and the receiver's state
    (the figures in :mod:`dicomnode.sizefmt`'s format, as the refusal and the operations page)."""
    state = "refusing: disk low" if judge(space, min_free_mb, max_used_pct) else "accepting"
    return (f"{size_text(space.free_bytes)} free (min {mb_text(min_free_mb)}), "
            f"{percent_text(space.used_pct)} used (max {percent_text(max_used_pct)}): {state}")


class DiskGuard:
    """Says whether ``path``'s volume is below the thresholds; thread-safe, cached for ``interval`` s.

    ``statvfs`` and ``clock`` are injectable for tests. ``min_free_mb = 0`` and ``max_used_pct = 100``
    switch the guard off (nothing is then read). ``quiet``: changes of state are logged at DEBUG only
    (a receive worker's guard, :mod:`dicomnode.network.receive_worker`: its parent's guard says it once).
    """

    def __init__(self, path: Path, min_free_mb: float, max_used_pct: float, *,
                 interval: float = CHECK_INTERVAL_S, statvfs: Callable[[Any], Any] = os.statvfs,
                 clock: Callable[[], float] = time.monotonic, quiet: bool = False) -> None:
        self.path = Path(path)
        self.quiet = quiet
        self.min_free_mb = min_free_mb
        self.max_used_pct = max_used_pct
        self.interval = interval
        self.statvfs = statvfs
        self.clock = clock
        self.enabled = min_free_mb > 0 or max_used_pct < 100
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._reason: str | None = None  # why the volume is low now; None: enough space
        self._unreadable = False

    @property
    def low(self) -> bool:
        """The state of the last check (no new reading)."""
        return self._reason is not None

    def refusal(self) -> str | None:
        """Why nothing may be written now (a short reason for a status comment), or None: go ahead."""
        if not self.enabled:
            return None
        now = self.clock()
        checked = self._checked_at
        if checked is not None and now - checked < self.interval:
            return self._reason  # the hot path: no lock, no syscall
        with self._lock:
            if self._checked_at is not None and now - self._checked_at < self.interval:
                return self._reason
            self._update(now)
            return self._reason

    def _update(self, now: float) -> None:
        """Read the volume, log a change of state; ``_checked_at`` is set last, after ``_reason``, so
        that a lock-free reader never takes an old reason for a fresh one."""
        try:
            space = read_space(self.statvfs(self.path))
        except OSError as exc:  # keep the last state: a write that really fails answers 0xA700 itself
            if not self._unreadable:
                event(log, "disk space unreadable", logging.WARNING, path=str(self.path),
                      error=f"{type(exc).__name__}: {exc}")
            self._unreadable = True
            self._checked_at = now
            return
        self._unreadable = False
        reason = judge(space, self.min_free_mb, self.max_used_pct)
        if reason is not None and self._reason is None:
            event(log, "disk space low, refusing instances", logging.DEBUG if self.quiet else logging.WARNING,
                  reason=reason, free_mb=f"{space.free_mb:.0f}", used_pct=f"{space.used_pct:.1f}",
                  min_free_disk_mb=f"{self.min_free_mb:.0f}", max_disk_used_pct=f"{self.max_used_pct:g}",
                  path=str(self.path))
        elif reason is None and self._reason is not None:
            event(log, "disk space recovered, accepting instances",
                  logging.DEBUG if self.quiet else logging.INFO, free_mb=f"{space.free_mb:.0f}",
                  used_pct=f"{space.used_pct:.1f}", path=str(self.path))
        self._reason = reason
        self._checked_at = now
