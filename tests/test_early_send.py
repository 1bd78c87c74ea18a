"""Outputs sent while their job still runs: through a running node, dcmtk storescp as the PACS.

Why through ``dicomnode serve``: the head start crosses three processes (the pipeline reports a file,
the worker puts it in the outbox, the sender stores it while the pipeline goes on), and the guarantees
are about what the PACS receives: each object once, and a re-run after a crash sends nothing again
and nothing different under a UID already sent. storescp keeps every C-STORE as its own file (+uf).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from peers import node_factory, pacs, requires_dcmtk, storescu  # noqa: F401 - fixtures
from series_factory import write_ct_series

pytestmark = requires_dcmtk

FINISHED = ("done", "failed", "rejected")


def received(pacs: Any) -> list[tuple[str, str]]:  # noqa: F811
    """(Modality, SOP Instance UID) of every C-STORE the PACS received, in name order."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in pacs.files()]
    return sorted((str(ds.Modality), str(ds.SOPInstanceUID)) for ds in headers)


def test_an_output_reported_early_is_in_the_pacs_before_the_job_ends(
        pacs: Any, node_factory: Any, tmp_path: Path) -> None:  # noqa: F811
    node = node_factory(pacs=pacs, pipeline="node_pipeline:early", stable_seconds=0.5)
    s = write_ct_series(tmp_path / "s", name="early", n=8, size=8)
    assert storescu(node.port, s.files).returncode == 0
    job = node.wait_job(s.series_uid, FINISHED, timeout=60)
    assert job["state"] == "done", (job, node.log()[-3000:])
    assert f"{job['id']} {s.series_uid} 8 early sent-while-running=True" in node.pipeline_runs()
    rows = node.sql("SELECT path, state, attempts FROM outbox WHERE job_id=? ORDER BY id", (job["id"],))
    assert [(r["state"], r["attempts"]) for r in rows] == [("sent", 1), ("sent", 1)]
    assert [uid for _, uid in received(pacs)] == sorted(Path(r["path"]).stem for r in rows)  # once each


def test_a_crash_after_the_early_sends_sends_nothing_a_second_time(
        pacs: Any, node_factory: Any, tmp_path: Path) -> None:  # noqa: F811
    """The real report (SEG, SR) from a threshold label map; the first attempt dies once its SEG and SR
    are in the PACS. The second keeps those files (its rebuilds equal them) and the job is done."""
    node = node_factory(pacs=pacs, pipeline="node_pipeline:measure_crash_once", stable_seconds=0.5,
                        worker={"poll_seconds": 0.2}, pairing={"retrieve_priors": False},
                        output={"summary": False})
    s = write_ct_series(tmp_path / "s", name="crash-once", n=8, size=16)
    for path in s.files:  # as a PACS holds it: the SEG copies the Type 2 birth date
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate = "19400101"
        ds.save_as(path, enforce_file_format=True)
    assert storescu(node.port, s.files).returncode == 0
    job = node.wait_job(s.series_uid, FINISHED, timeout=90)
    assert job["state"] == "done" and job["attempts"] == 2, (job, node.log()[-3000:])
    runs = [r.split(" ", 3)[3] for r in node.pipeline_runs() if s.series_uid in r]
    assert runs == ["measure", "crash after the SEG and SR were sent=True", "measure"]
    got = received(pacs)
    assert [m for m, _ in got] == ["SEG", "SR"]  # each once, though both attempts built and handed them on
    rows = node.sql("SELECT path, state, attempts FROM outbox WHERE job_id=? ORDER BY id", (job["id"],))
    assert sorted((Path(r["path"]).stem, r["state"], r["attempts"]) for r in rows) == sorted(
        (uid, "sent", 1) for _, uid in got)
    outputs = node.storage_dir / "results" / s.series_uid / "outputs"
    seg_uid = next(uid for m, uid in got if m == "SEG")
    assert pydicom.dcmread(outputs / f"{seg_uid}.dcm").SOPInstanceUID == seg_uid
