"""The stability watcher wakes when a series falls quiet, not on the next polling tick."""

from __future__ import annotations

from pathlib import Path

from series_factory import write_ct_series

from dicomnode.config import SelectionSettings, Settings
from dicomnode.db import Database
from dicomnode.harness.ingest import store_files
from dicomnode.storage.series import StabilityWatcher
from dicomnode.storage.store import Store


def test_next_wait_is_the_time_until_the_first_series_falls_quiet(tmp_path: Path) -> None:
    settings = Settings(storage_dir=tmp_path / "var", stable_seconds=1.0, host="127.0.0.1",
                        min_free_disk_mb=0, max_disk_used_pct=100,
                        selection=SelectionSettings(min_z_extent_mm=30.0, min_slices=5))
    db = Database(settings.db_path)
    try:
        watcher = StabilityWatcher(settings, db)
        assert watcher.interval == 0.25
        assert watcher.next_wait() == 0.25  # nothing receiving: the polling interval
        series = write_ct_series(tmp_path / "in", name="a", n=6, size=8)
        store_files(Store(settings.storage_dir, db), series.files)
        last = float(db.one("SELECT last_received_at FROM series")[0])
        assert watcher.next_wait(last) == 0.25  # quiet in 1 s: the next tick comes first
        assert abs(watcher.next_wait(last + 0.9) - 0.102) < 1e-6  # due in 0.1 s: wake then (+2 ms)
        assert watcher.check_once(last + 0.9) == []
        assert watcher.next_wait(last + 1.5) == 0.25  # overdue and still open (the check left it): poll
        with db.tx() as con:  # quiet for over a second by now
            con.execute("UPDATE series SET last_received_at = last_received_at - 2")
        assert watcher.check_once() == [1]
        assert watcher.next_wait() == 0.25  # closed: nothing receiving any more
        # a held series (incomplete) is due at its hold's end, not at its last instance
        with db.tx() as con:
            con.execute("UPDATE jobs SET state='receiving', next_attempt_at=? WHERE id=1", (last + 5.0,))
        assert abs(watcher.next_wait(last + 4.95) - 0.052) < 1e-6
        assert watcher.next_wait(last + 1.1) == 0.25
    finally:
        db.close()


def test_headers_walked_directly_equal_pydicoms(tmp_path: Path) -> None:
    """Selection reads plain files with the element walker; what it sees must be pydicom's reading."""
    import pydicom

    from dicomnode.storage.series import HEADER_TAGS, read_headers

    files = write_ct_series(tmp_path / "in", name="h", n=5, size=8).files
    (tmp_path / "junk.dcm").write_bytes(b"not DICOM")  # pydicom's verdict: unreadable
    headers, unreadable = read_headers([*files, tmp_path / "junk.dcm"])
    assert unreadable == 1 and len(headers) == len(files)
    for ds, path in zip(headers, files, strict=True):
        ref = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        for kw in HEADER_TAGS:
            assert (kw in ds) == (kw in ref) and (kw not in ds or ds[kw].value == ref[kw].value), kw
