"""A study recorded offline (``segment --record``) and the other study of the patient received by a
running node: the node finds the recorded study's CT where ``segment --record`` does
(:mod:`dicomnode.processing.sources`: its store, else the files it was recorded from), so a
follow-up's page shows the recorded baseline's key images, and a late baseline sends the recorded
follow-up's change SR and the page that replaces its first. When those files have moved, the node's
fallback applies with its warning, and the node's log never names the archive's folders.

The node runs ``node_pipeline:measure`` (the real pipeline from the label map on, no model) and the
offline run the same label map (``node_pipeline.threshold_labels``) in place of the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node_pipeline import threshold_labels
from peers import node_factory, pacs, requires_dcmtk, storescu  # noqa: F401 - fixtures
from stand_in_model import use_label_function
from typer.testing import CliRunner

from dicomnode.cli import app
from reporting.followup_sr import FOLLOWUP_SERIES_NUMBER
from reporting.summary import SUMMARY_SERIES_NUMBER, key_images_size, render_page
from seg.io import load_dicom_series
from seg.phantom import PhantomOptions, make_phantom, write_phantom
from seg.records import ChangeRecord, VolumeRecord

pytestmark = requires_dcmtk

FINISHED = ("done", "failed", "rejected")
PATIENT_FOLDER = "DOE_JANE"  # an archive's folder named after the patient: never in the node's log
STUDIES = {"pre": "20240101", "post": "20240601"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, Path]]:
    """The patient's two CTs: time point → (StudyInstanceUID, SeriesInstanceUID, DICOM folder)."""
    root = tmp_path_factory.mktemp("recorded_studies")
    out = {}
    for when, date in STUDIES.items():
        ph = make_phantom(PhantomOptions(seed=11, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=(-45.0, 15.0),
                                         patient_id="RECNODE1", study_date=date, postop=when == "post"))
        write_phantom(ph, root / when)
        out[when] = (str(ph.header.study_instance_uid), str(ph.header.series_instance_uid),
                     root / when / "dicom")
    return out


@pytest.fixture
def threshold_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The offline run's model stand-in: the node's test pipeline's label map."""
    use_label_function(monkeypatch, threshold_labels)


def _node(node_factory: Any, pacs: Any) -> Any:  # noqa: F811
    return node_factory(pacs=pacs, pipeline="node_pipeline:measure", pairing={"retrieve_priors": False})


def _record(node: Any, folder: Path) -> None:
    """``segment CT --record`` with the node's configuration, beside the running node."""
    r = CliRunner().invoke(app, ["segment", str(folder), "--record", "--no-progress",
                                 "--config", str(node.config)])
    assert r.exit_code == 0, r.output


def _receive(node: Any, folder: Path, series_uid: str) -> dict[str, Any]:
    assert storescu(node.port, sorted(folder.iterdir())).returncode == 0
    job = node.wait_job(series_uid, FINISHED, timeout=120)
    assert job["state"] == "done", (job, node.log()[-3000:])
    return job


def _in_pacs(pacs: Any, study_uid: str, series_number: int) -> list[pydicom.Dataset]:  # noqa: F811
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in pacs.files()]
    return [ds for ds in headers if ds.get("SeriesNumber") == series_number
            and ds.get("StudyInstanceUID") == study_uid]


def _key_rows(node: Any, page: pydicom.Dataset, post: tuple[str, str, Path], base_uid: str) -> int:
    """The height of the key-image panel below the follow-up page's table (the page without it is
    rendered again from the node's results)."""
    results = node.storage_dir / "results" / post[1]
    record = VolumeRecord.load(results / "volumes.json")
    change = ChangeRecord.load(results / f"change-{base_uid}.json")
    table = render_page(record, record.model, load_dicom_series(post[2]).header, change)
    return int(page.Rows) - table.shape[0]


def test_a_followup_received_shows_the_key_images_of_a_baseline_recorded_offline(
        phantoms: dict[str, tuple[str, str, Path]], threshold_model: None, node_factory: Any,  # noqa: F811
        pacs: Any, tmp_path: Path) -> None:  # noqa: F811
    node = _node(node_factory, pacs)
    archive = tmp_path / "archive" / PATIENT_FOLDER
    shutil.copytree(phantoms["pre"][2], archive / "pre")
    _record(node, archive / "pre")
    post = phantoms["post"]
    _receive(node, post[2], post[1])
    (page,) = _in_pacs(pacs, post[0], SUMMARY_SERIES_NUMBER)
    assert _key_rows(node, page, post, phantoms["pre"][1]) == key_images_size(2)[0]  # pre above post
    assert len(_in_pacs(pacs, post[0], FOLLOWUP_SERIES_NUMBER)) == 1
    assert "no baseline key images" not in node.log()


def test_a_late_baseline_received_reports_a_followup_recorded_offline(
        phantoms: dict[str, tuple[str, str, Path]], threshold_model: None, node_factory: Any,  # noqa: F811
        pacs: Any, tmp_path: Path) -> None:  # noqa: F811
    """The recorded follow-up's change SR and its page with the comparison, instance 2 of its summary
    series, go to the PACS from the baseline's job (the follow-up's first page never went: offline)."""
    node = _node(node_factory, pacs)
    archive = tmp_path / "archive" / PATIENT_FOLDER
    shutil.copytree(phantoms["post"][2], archive / "post")
    _record(node, archive / "post")
    pre, post = phantoms["pre"], phantoms["post"]
    job = _receive(node, pre[2], pre[1])
    assert "object(s) for later studies" in job["message"], job
    (sr,) = _in_pacs(pacs, post[0], FOLLOWUP_SERIES_NUMBER)
    assert (node.storage_dir / "results" / post[1] / "outputs" / f"{sr.SOPInstanceUID}.dcm").is_file()
    (page,) = _in_pacs(pacs, post[0], SUMMARY_SERIES_NUMBER)
    assert page.InstanceNumber == 2 and page.ImageComments.startswith("Replaces instance 1")
    assert _key_rows(node, page, post, pre[1]) == key_images_size(2)[0]
    assert "no follow-up report" not in node.log()


def test_a_recorded_baseline_whose_files_moved_leaves_the_followup_its_own_key_images(
        phantoms: dict[str, tuple[str, str, Path]], threshold_model: None, node_factory: Any,  # noqa: F811
        pacs: Any, tmp_path: Path) -> None:  # noqa: F811
    """The change is still reported (it comes from the results); the page shows the follow-up alone,
    the warning says why, and no log line names the archive's folders."""
    node = _node(node_factory, pacs)
    archive = tmp_path / "archive" / PATIENT_FOLDER
    shutil.copytree(phantoms["pre"][2], archive / "pre")
    _record(node, archive / "pre")
    archive.rename(tmp_path / "archive" / "moved")
    post = phantoms["post"]
    _receive(node, post[2], post[1])
    (page,) = _in_pacs(pacs, post[0], SUMMARY_SERIES_NUMBER)
    assert _key_rows(node, page, post, phantoms["pre"][1]) == key_images_size(1)[0]  # post alone
    assert len(_in_pacs(pacs, post[0], FOLLOWUP_SERIES_NUMBER)) == 1
    log = node.log()
    assert (f"no baseline key images of series {phantoms['pre'][1]}: the baseline's instances are no "
            "longer stored") in log
    assert PATIENT_FOLDER not in log and str(tmp_path / "archive") not in log
