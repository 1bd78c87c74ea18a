"""``series_complete_on_release``: a series is complete when its association is released, not after quiet.

Real peers: ``dicomnode serve`` with ``stable_seconds`` = 60, dcmtk storescu (release, ``--abort``) and a
pynetdicom association held open. The worker is off, so a completed series stays ``queued`` to be seen.
Where "not completed" is asserted, a control series sent afterwards over a released association is
waited for first: once the watcher has queued it, it has handled every release reported before.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from peers import NodeProcess, requires_dcmtk, storescu
from pydantic import ValidationError
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicomnode.config import Settings
from dicomnode.harness.orthanc import OrthancServer, have_orthanc
from dicomnode.harness.scu import nodelay
from dicomnode.harness.series import SeriesFiles, write_ct_series

pytestmark = requires_dcmtk

STABLE = 60.0  # no series here may close by falling quiet
PROMPT = 20.0  # generous bound for "at once", well under STABLE
CLOSED = ("queued", "running", "sending", "done")


def _node(workdir: Path, on: bool) -> NodeProcess:
    return NodeProcess(workdir, stable_seconds=STABLE, series_complete_on_release=on,
                       worker={"enabled": False}).start()


@pytest.fixture(scope="module")
def node_on(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = _node(tmp_path_factory.mktemp("release-on"), True)
    yield node
    node.stop()


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("series")


def _series(folder: Path, name: str, n: int = 6) -> SeriesFiles:
    return write_ct_series(folder / name, name=name, n=n, slice_mm=5.0)


def _send(node: NodeProcess, files: list[Path], *extra: str) -> None:
    result = storescu(node.port, files, extra=extra)
    assert result.returncode == 0, result.stderr


def _state(node: NodeProcess, series_uid: str) -> str:
    jobs = node.jobs(series_uid)
    assert jobs, f"no job for {series_uid}"
    return str(jobs[-1]["state"])


def _control(node: NodeProcess, folder: Path, name: str) -> None:
    """A series over a released association, completed: the watcher has handled earlier releases."""
    control = _series(folder, name)
    _send(node, control.files)
    node.wait_job(control.series_uid, CLOSED, timeout=PROMPT)


def test_release_completes_series_at_once(node_on: NodeProcess, series_dir: Path) -> None:
    series = _series(series_dir, "released")
    _send(node_on, series.files)
    job = node_on.wait_job(series.series_uid, CLOSED, timeout=PROMPT)  # PROMPT, well under STABLE
    assert job["state"] == "queued" and job["n_instances"] == len(series.files)


def test_abort_does_not_complete(node_on: NodeProcess, series_dir: Path) -> None:
    aborted = _series(series_dir, "aborted")
    result = storescu(node_on.port, aborted.files, extra=["--abort"])
    assert result.returncode == 0, result.stderr
    assert len(node_on.sql("SELECT 1 FROM instances WHERE series_uid=?", (aborted.series_uid,))) == 6
    _control(node_on, series_dir, "after-abort")
    assert _state(node_on, aborted.series_uid) == "receiving"


def test_release_waits_for_another_open_association(node_on: NodeProcess, series_dir: Path) -> None:
    shared = _series(series_dir, "shared", n=8)
    ae = AE("HOLDER")
    ae.add_requested_context(CTImageStorage)
    holder = ae.associate("127.0.0.1", node_on.port, ae_title=node_on.ae_title)
    assert holder.is_established
    try:
        nodelay(holder)
        for path in shared.files[:4]:
            assert holder.send_c_store(pydicom.dcmread(path)).Status == 0
        _send(node_on, shared.files[4:])  # the second association delivers the rest and is released
        _control(node_on, series_dir, "while-held")
        assert _state(node_on, shared.series_uid) == "receiving"
    finally:
        holder.release()
    job = node_on.wait_job(shared.series_uid, CLOSED, timeout=PROMPT)
    assert job["state"] == "queued" and job["n_instances"] == 8


def test_late_instance_after_release_supersedes(node_on: NodeProcess, series_dir: Path) -> None:
    series = _series(series_dir, "late", n=7)
    _send(node_on, series.files[:6])
    first = node_on.wait_job(series.series_uid, CLOSED, timeout=PROMPT)
    _send(node_on, series.files[:6])  # an identical re-send re-opens nothing
    _control(node_on, series_dir, "after-resend")
    assert [j["id"] for j in node_on.jobs(series.series_uid)] == [first["id"]]
    _send(node_on, series.files[6:])  # a late instance: a new job, closed by its own release
    second = node_on.wait_job(series.series_uid, CLOSED, timeout=PROMPT)
    jobs = {j["id"]: j for j in node_on.jobs(series.series_uid)}
    assert second["id"] != first["id"] and second["n_instances"] == 7
    assert jobs[first["id"]]["state"] == "superseded" and jobs[first["id"]]["superseded_by"] == second["id"]


def test_off_by_default_waits_for_quiet(tmp_path: Path) -> None:
    assert Settings().series_complete_on_release is False
    node = _node(tmp_path / "node", False)
    try:
        series = _series(tmp_path, "quiet")
        _send(node, series.files)
        time.sleep(2.0)  # the released case above closes well within this
        assert _state(node, series.series_uid) == "receiving"
    finally:
        node.stop()


@pytest.mark.skipif(not have_orthanc(), reason="Orthanc not installed")
def test_orthanc_routed_series_completes_on_release(tmp_path: Path) -> None:
    """Orthanc's route.lua job releases its association once the series is sent: no quiet wait."""
    node = NodeProcess(tmp_path / "node", stable_seconds=STABLE, series_complete_on_release=True,
                       allowed_calling_aets=["ORTHANC"], worker={"enabled": False})
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node.port, stable_age=1)
    node.start()
    orthanc.start()
    try:
        series = write_ct_series(tmp_path / "thigh", name="thigh", n=20, slice_mm=5.0)  # routed: a thigh hint
        orthanc.upload_folder(tmp_path / "thigh")
        job = node.wait_job(series.series_uid, CLOSED, timeout=PROMPT + 10)  # + Orthanc's StableAge
        assert job["state"] == "queued" and job["n_instances"] == 20
    finally:
        orthanc.stop()
        node.stop()


def test_refused_with_receive_processes() -> None:
    with pytest.raises(ValidationError, match="receive_processes = 1"):
        Settings(series_complete_on_release=True, receive_processes=2)
