"""The summary page drafted by a forked child while the SEG and SR are built
(:class:`dicomnode.processing.pipeline.SummaryDraft`): the very page built after pairing, handed on when
pairing finds no comparison, stopped and removed when it is not wanted, built in the parent when the
child fails, and kept as it is by a re-run once handed on."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from test_reporting_seg import MODEL, phantom_case

from dicomnode.config import Settings
from dicomnode.processing.phases import PhaseLog, read_spans
from dicomnode.processing.pipeline import (
    JobInput,
    OutputChanged,
    SummaryDraft,
    _save,
    _without_build_times,
    report,
    summary_page,
)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    return phantom_case(tmp_path_factory.mktemp("draft"))


def _content(path: Path) -> pydicom.Dataset:
    return _without_build_times(pydicom.dcmread(path))


def test_the_draft_is_the_page_built_here_and_is_built_by_a_child(case: Any, tmp_path: Path) -> None:
    ct, labels, vols = case
    draft = SummaryDraft(tmp_path / "draft", lambda: summary_page(ct, labels, vols, MODEL),
                         PhaseLog(tmp_path))
    drafted = draft.take()
    assert drafted.parent == tmp_path / "draft"
    assert _content(drafted) == _content(_save(summary_page(ct, labels, vols, MODEL), tmp_path / "here"))
    (span,) = [s for s in read_spans(tmp_path) if s.phase == "summary encoding (background)"]
    assert span.pid != os.getpid()
    draft.drop()
    assert not (tmp_path / "draft").exists()


def test_a_draft_not_wanted_is_stopped_and_removed(tmp_path: Path) -> None:
    def never_done() -> Any:
        time.sleep(600)  # only a kill ends it (the test would hang here otherwise)

    draft = SummaryDraft(tmp_path / "draft", never_done, PhaseLog(None))
    child = draft._write._pid
    assert child is not None
    draft.drop()
    with pytest.raises(ProcessLookupError):  # killed and reaped: no zombie left behind
        os.kill(child, 0)
    assert not (tmp_path / "draft").exists()


def test_a_failed_child_leaves_the_page_to_the_parent(case: Any, tmp_path: Path) -> None:
    ct, labels, vols = case
    parent = os.getpid()
    builders: list[str] = []

    def build() -> Any:
        if os.getpid() != parent:
            raise MemoryError("the child could not build the page")
        builders.append("parent")
        return summary_page(ct, labels, vols, MODEL)

    draft = SummaryDraft(tmp_path / "draft", build, PhaseLog(None))
    drafted = draft.take()
    assert builders == ["parent"]
    assert _content(drafted) == _content(_save(summary_page(ct, labels, vols, MODEL), tmp_path / "here"))
    draft.drop()


def test_the_node_hands_the_drafted_page_on_and_a_rerun_keeps_it(case: Any, tmp_path: Path) -> None:
    """The first attempt hands the page on as soon as it is among the outputs (with the SEG and SR);
    a re-run keeps every file handed on, hands nothing on again, and fails rather than replace a page
    handed on with other content."""
    ct, labels, _ = case
    settings = Settings(storage_dir=tmp_path / "var", pairing={"retrieve_priors": False})
    uid = str(ct.header.series_instance_uid)

    def attempt(n: int, handed_on: frozenset[Path] = frozenset()) -> tuple[list[Path], list[Path]]:
        heard: list[Path] = []
        job = JobInput(job_id=1, series_instance_uid=uid, files=list(ct.source_files),
                       work_dir=tmp_path / f"attempt{n}", outputs_in_outbox=handed_on,
                       output_ready=heard.append)
        job.work_dir.mkdir()
        return report(job, settings, ct, labels, MODEL).outputs, heard

    outputs, heard = attempt(1)
    modality = {p: str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in outputs}
    assert sorted(modality.values()) == ["OT", "SEG", "SR"]
    assert sorted(heard) == sorted(outputs)  # each handed on before the job's end, once
    results = settings.storage_dir / "results" / uid
    assert sorted((results / "outputs").iterdir()) == sorted(outputs)
    assert not (results / "summary-draft").exists()

    before = {p: p.read_bytes() for p in outputs}
    again, heard = attempt(2, frozenset(outputs))
    assert again == outputs and heard == []
    assert {p: p.read_bytes() for p in outputs} == before  # kept, not written again

    (page,) = [p for p in outputs if modality[p] == "OT"]
    ds = pydicom.dcmread(page)
    ds.SeriesDescription = "other content"
    ds.save_as(page, enforce_file_format=True)
    with pytest.raises(OutputChanged):
        attempt(3, frozenset(outputs))
    assert pydicom.dcmread(page).SeriesDescription == "other content"  # still the file handed on
    assert not (results / "summary-draft").exists()
