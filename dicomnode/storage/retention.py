"""Retention: delete received instances ``retention_days`` after their series' results were all sent.

Why: the received CT is the node's largest store of patient data, and once its results are in the PACS
the node no longer needs it (the PACS keeps the original; ``dicomnode retry`` re-sends results, not
CT). So a site can keep it for a fixed time (to re-run a job or investigate) and no longer.

Never before: a series qualifies only when its current job is ``done``, no job of the series is still
receiving, queued, running or sending, and every output of that content (its job, or the earlier job
whose results a same-content job re-used) is ``sent``; the clock starts at the last of those sends. A
rejected or failed series is not touched. Results (``results/``), the pairing timeline and the
patient/study rows stay: pairing compares a later study with them, not with the CT.

Each instance goes under the store's per-SOP lock, file first, then its index row: a crash between
leaves a row without a file (removed at the next pass), never a file without a row that a restart
would re-index as new content. An instance that arrives while its series is purged re-opens the series
as usual and is kept.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import Settings
from dicomnode.db import now
from dicomnode.logs import event
from dicomnode.processing import jobs
from dicomnode.processing.outbox import OutboxState
from dicomnode.storage.store import Store

log = logging.getLogger(__name__)

DAY_SECONDS = 86400.0
INTERVAL_SECONDS = 3600.0  # how often ``serve`` looks for due series

_ACTIVE = sorted(state.value for state in jobs.ACTIVE)
# series whose current job is done, that hold no job still active, and whose results were all sent before
# the cutoff (the last parameter)
_DUE = f"""
SELECT s.series_uid, s.current_job, MAX(o.sent_at) AS sent_at
FROM series s
JOIN jobs cur ON cur.id = s.current_job AND cur.state = ? AND cur.content_hash IS NOT NULL
JOIN jobs j ON j.series_uid = s.series_uid AND j.content_hash = cur.content_hash
JOIN outbox o ON o.job_id = j.id
WHERE EXISTS (SELECT 1 FROM instances i WHERE i.series_uid = s.series_uid)
  AND NOT EXISTS (SELECT 1 FROM jobs b WHERE b.series_uid = s.series_uid
                  AND b.state IN ({", ".join("?" * len(_ACTIVE))}))
GROUP BY s.series_uid, s.current_job
HAVING SUM(o.state <> ?) = 0 AND MAX(o.sent_at) <= ?
ORDER BY sent_at
"""


@dataclass(frozen=True)
class DueSeries:
    """A series whose instances may go: its current job and when its last result was sent."""

    series_uid: str
    job_id: int
    sent_at: float


@dataclass(frozen=True)
class Purged:
    """What one pass removed from one series (``complete``: False when it was re-opened meanwhile)."""

    series_uid: str
    instances: int
    complete: bool


class Retention:
    """Deletes due instances; :meth:`run` repeats :meth:`purge_once` every INTERVAL_SECONDS."""

    def __init__(self, settings: Settings, store: Store, interval: float = INTERVAL_SECONDS) -> None:
        self.settings = settings
        self.store = store
        self.db = store.db
        self.interval = interval

    def due(self, t: float | None = None) -> list[DueSeries]:
        """Series whose results were all sent at least ``retention_days`` before ``t`` (default now)."""
        days = self.settings.retention_days
        if days is None:
            return []
        cutoff = (now() if t is None else t) - days * DAY_SECONDS
        rows = self.db.query(_DUE, (jobs.JobState.DONE.value, *_ACTIVE, OutboxState.SENT.value, cutoff))
        return [DueSeries(str(r["series_uid"]), int(r["current_job"]), float(r["sent_at"])) for r in rows]

    def purge_once(self, t: float | None = None) -> list[Purged]:
        """Delete the instances of every due series; ``t`` stands in for the clock (tests)."""
        purged = [self._purge_series(series) for series in self.due(t)]
        for p in purged:
            event(log, "retention purged", series=p.series_uid, instances=p.instances,
                  complete="yes" if p.complete else "no (series re-opened)")
        return purged

    def _purge_series(self, series: DueSeries) -> Purged:
        rows = self.db.query("SELECT sop_uid, path FROM instances WHERE series_uid=? ORDER BY sop_uid",
                             (series.series_uid,))
        removed = 0
        for row in rows:
            if not self._purge_instance(series, str(row["sop_uid"]), Path(row["path"])):
                return Purged(series.series_uid, removed, complete=False)
            removed += 1
        self._tidy(series.series_uid, Path(rows[0]["path"]).parent if rows else None)
        return Purged(series.series_uid, removed, complete=True)

    def _purge_instance(self, series: DueSeries, sop_uid: str, path: Path) -> bool:
        """File, then row, under the SOP's lock; False (nothing done) when the series was re-opened."""
        with self.store._sop_lock(sop_uid):  # the lock every C-STORE of this SOP UID takes
            current = self.db.one("SELECT current_job FROM series WHERE series_uid=?", (series.series_uid,))
            if current is None or current["current_job"] != series.job_id:
                return False
            path.unlink(missing_ok=True)
            with self.db.tx() as con:
                con.execute("DELETE FROM instances WHERE sop_uid=? AND series_uid=?",
                            (sop_uid, series.series_uid))
        return True

    def _tidy(self, series_uid: str, folder: Path | None) -> None:
        """Count what is left of the series and remove its folder (and its study's) once empty."""
        with self.db.tx() as con:
            con.execute("UPDATE series SET n_instances=(SELECT COUNT(*) FROM instances WHERE series_uid=?)"
                        " WHERE series_uid=?", (series_uid, series_uid))
        for level in (folder, folder.parent if folder else None):
            if level is None or self.store.incoming not in level.parents:
                continue
            try:
                level.rmdir()
            except OSError:  # not empty (another series of the study, or a new instance): keep it
                break

    def run(self, stop: threading.Event) -> None:
        """Purge due series now and every ``interval`` seconds until ``stop``."""
        while not stop.is_set():
            try:
                self.purge_once()
            except Exception:
                log.exception("retention")
            stop.wait(self.interval)
