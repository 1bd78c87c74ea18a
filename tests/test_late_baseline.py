"""The late-baseline flow through a running node: the follow-up study arrives first, its baseline later.

Why through ``dicomnode serve``: the comparison only exists once the baseline's job has recorded its
result, and the report belongs to the *other* study, so only the whole chain (store → watcher →
worker → pipeline → pairing → outbox → sender) shows that it is built and sent, and sent once. The
pipeline is the real one from the label map on (``node_pipeline:measure``: no model, no inference);
dcmtk storescp is the PACS and keeps every C-STORE it receives as its own file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from peers import node_factory, pacs, requires_dcmtk, storescu  # noqa: F401 - fixtures
from series_factory import write_ct_series

from dicomnode.config import check_file
from dicomnode.processing.pipeline import JobInput, later_followups
from reporting.followup_sr import FOLLOWUP_SERIES_NUMBER
from seg.records import ChangeRecord

pytestmark = requires_dcmtk

FINISHED = ("done", "failed", "rejected")


def followup_srs(pacs: Any) -> list[pydicom.Dataset]:  # noqa: F811
    """Every follow-up (change) SR the PACS received, one per C-STORE (storescp +uf: unique names)."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in pacs.files()]
    return [ds for ds in headers if ds.get("SeriesNumber") == FOLLOWUP_SERIES_NUMBER]


def ct_series(folder: Path, name: str, n: int, study_date: str) -> Any:
    """A small CT series of one patient as a PACS would hold it (with the Type 2 birth date)."""
    series = write_ct_series(folder, name=name, n=n, study_date=study_date, patient_id="LATE-BASELINE-1",
                             size=32, pixel_mm=2.0)
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate = "19400101"
        ds.save_as(path, enforce_file_format=True)
    return series


def test_a_late_baseline_sends_the_followup_sr_once(pacs: Any, node_factory: Any, tmp_path: Path) -> None:  # noqa: F811
    node = node_factory(pacs=pacs, pipeline="node_pipeline:measure",
                        pairing={"retrieve_priors": False}, output={"summary": False})
    follow = ct_series(tmp_path / "follow", "late-follow", n=10, study_date="20240601")
    base = ct_series(tmp_path / "base", "late-base", n=12, study_date="20240101")

    assert storescu(node.port, follow.files).returncode == 0
    job = node.wait_job(follow.series_uid, FINISHED, timeout=60)
    assert job["state"] == "done", (job, node.log()[-3000:])
    assert followup_srs(pacs) == []  # alone in its timeline: nothing to compare with yet

    assert storescu(node.port, base.files).returncode == 0
    job = node.wait_job(base.series_uid, FINISHED, timeout=60)
    assert job["state"] == "done", (job, node.log()[-3000:])
    assert "1 object(s) for later studies (change SRs, summary pages)" in job["message"]
    assert [j["state"] for j in node.jobs()] == ["done", "done"]  # nothing more is owed to the PACS

    (sr,) = followup_srs(pacs)  # sent exactly once
    assert (sr.StudyInstanceUID, sr.PatientID) == (follow.study_uid, "LATE-BASELINE-1")
    results = node.storage_dir / "results" / follow.series_uid
    assert (results / "outputs" / f"{sr.SOPInstanceUID}.dcm").is_file()
    change = ChangeRecord.load(results / f"change-{base.series_uid}.json")
    vl = next(s for s in change.structures if s.name == "vastus_lateralis" and s.side == "both")
    assert vl.change_pct == pytest.approx(100 * (10 - 12) / 12, abs=0.1)  # 10 of 12 slices remain

    # Deterministic: building it again from the same two studies gives the same object.
    settings = check_file(node.config)
    again = later_followups(settings, JobInput(job_id=job["id"], series_instance_uid=base.series_uid,
                                               files=base.files, work_dir=tmp_path,
                                               series_files=lambda uid: follow.files))
    assert [p.stem for p in again] == [str(sr.SOPInstanceUID)]
