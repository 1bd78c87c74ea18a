"""Where the CT of another series is, for ``segment --record`` (offline): a follow-up's page shows
its baseline's key images, and a baseline recorded after its follow-up builds the follow-up's change
SR and page, so the job needs that series' CT (``JobInput.series_files``).

Why a file of its own: on the node every measured CT is in its store; a series recorded offline
was read from an archive folder the store knows nothing of. Its results folder therefore says which
files it was read from (``source.json``), written once, when it is recorded, and read here only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from dicomnode.processing.isolation import IndexedSeriesFiles

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


def _remembered(result_dir: Path) -> list[Path]:
    """The files ``source.json`` names, when every one of them is still there; else none."""
    path = result_dir / SOURCE_FILE
    if not path.is_file():
        return []
    try:
        files = RecordedSource.model_validate_json(path.read_text()).files
    except (OSError, ValueError) as exc:
        log.warning("%s cannot be read: %s", path, exc)
        return []
    return files if files and all(f.is_file() for f in files) else []


@dataclass(frozen=True)
class OfflineSeriesFiles:
    """``JobInput.series_files`` for ``segment --record``: the series being recorded in this run
    (``at_hand``), else the node's store, else the files a series recorded offline was read from."""

    db_path: Path
    results: Path  # the node's results folder: results/<SeriesInstanceUID>/
    at_hand: Mapping[str, list[Path]] = field(default_factory=dict)

    def __call__(self, series_uid: str) -> list[Path]:
        if series_uid in self.at_hand:
            return list(self.at_hand[series_uid])
        stored = IndexedSeriesFiles(self.db_path)(series_uid) if self.db_path.is_file() else []
        return stored or _remembered(self.results / series_uid)
