"""Where the CT of another series is: a follow-up's summary page shows its baseline's key images, and
a baseline that comes after its follow-up builds the follow-up's change SR and page, so a job needs
that series' CT (``JobInput.series_files``). The node's jobs and ``segment --record`` find it here,
in one order, so a study is reported alike whichever of the two measured the other one.

Why a file of its own (``results/<series>/source.json``): a CT the node received is in its store; a
series recorded offline was read from an archive folder the store knows nothing of. Its results
folder therefore says which files it was read from, written once, when it is recorded, and read
here only. The paths may name a patient's folder: they are logged at DEBUG only.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from dicomnode.processing.pipeline import results_root

if TYPE_CHECKING:
    from dicomnode.config import Settings

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"


class RecordedSource(BaseModel):
    """The CT files a series recorded offline was read from (absolute paths)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = 1
    files: list[Path]


def remember_source(result_dir: Path, files: Sequence[Path]) -> Path:
    """Write ``result_dir/source.json``: where this series' CT was read from."""
    result_dir.mkdir(parents=True, exist_ok=True)
    path = result_dir / SOURCE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(RecordedSource(files=sorted(Path(f).resolve() for f in files)).model_dump_json(indent=2))
    tmp.replace(path)
    return path


def _indexed(db_path: Path, series_uid: str) -> list[Path]:
    """The node's stored instances of a series, read from its index (read-only: a job's child
    process cannot share the node's open connection)."""
    if not db_path.is_file():
        return []
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT path FROM instances WHERE series_uid=? ORDER BY path",
                           (series_uid,)).fetchall()
    finally:
        con.close()
    return [Path(r[0]) for r in rows]


def _series_of(first: Path) -> str | None:
    """The SeriesInstanceUID in ``first``'s header; None when it cannot be read."""
    import pydicom

    try:
        ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except (pydicom.errors.InvalidDicomError, OSError) as exc:
        log.debug("%s cannot be read: %s", first, exc)
        return None
    return str(ds.get("SeriesInstanceUID", ""))


def _remembered(result_dir: Path) -> list[Path]:
    """The files ``source.json`` names, when every one of them is still there and of this series;
    else none (the caller's fallback then says that the series' CT is no longer at hand)."""
    path = result_dir / SOURCE_FILE
    if not path.is_file():
        return []
    try:
        files = RecordedSource.model_validate_json(path.read_text()).files
    except (OSError, ValueError) as exc:  # its text may quote the paths: DEBUG only
        log.warning("series %s: its %s cannot be read", result_dir.name, SOURCE_FILE)
        log.debug("%s: %s", path, exc)
        return []
    if (gone := next((f for f in files if not f.is_file()), None)) is not None or not files:
        log.debug("series %s: a file it was recorded from is gone: %s", result_dir.name, gone)
        return []
    # an archive folder rewritten since would put another CT (another patient's?) in this study's report
    if (uid := _series_of(files[0])) != result_dir.name:
        if uid is not None:
            log.warning("series %s: the files it was recorded from hold another series now",
                        result_dir.name)
        return []
    log.debug("series %s: its CT from the %d files it was recorded from", result_dir.name, len(files))
    return files


@dataclass(frozen=True)
class SeriesLookup:
    """``JobInput.series_files``: the CT files of another series, from the series at hand in this run
    (``segment --batch --record``'s other series), else the node's store, else the files a series
    recorded offline was read from. None found: an empty list (each caller has its fallback)."""

    db_path: Path  # the node's index
    results: Path  # the node's results folder: results/<SeriesInstanceUID>/
    at_hand: Mapping[str, list[Path]] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: Settings, at_hand: Mapping[str, list[Path]] | None = None) -> SeriesLookup:
        """The lookup in the storage of the node ``settings`` configure."""
        return cls(settings.db_path, results_root(settings.storage_dir), dict(at_hand or {}))

    def __call__(self, series_uid: str) -> list[Path]:
        if series_uid in self.at_hand:
            return list(self.at_hand[series_uid])
        return _indexed(self.db_path, series_uid) or _remembered(self.results / series_uid)
