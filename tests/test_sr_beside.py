"""The measurement SR built beside the SEG: from the SEG's header and frame index while the SEG's frames
are encoded (:class:`reporting.seg.BuiltSeg`), by a forked child in the node
(:func:`dicomnode.processing.pipeline.build_outputs`' ``sr_beside``). The SR and SEG are the very files
the sequential build writes; the child's failure leaves the SR to the parent; the SR is handed on only
after the SEG, never beside a SEG whose re-run check failed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from test_reporting_seg import MODEL, _fixed_time, phantom_case

from dicomnode.config import Settings
from dicomnode.processing.phases import read_spans
from dicomnode.processing.pipeline import JobInput, OutputChanged, _without_build_times, build_outputs, report
from reporting.seg import build_seg_frames
from reporting.sr import build_measurement_sr, measurement_sr_uid

PIXEL_DATA, PER_FRAME = 0x7FE00010, 0x52009230


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    return phantom_case(tmp_path_factory.mktemp("beside"))


def _bytes(ds: pydicom.Dataset, path: Path) -> bytes:
    _fixed_time(ds)
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


@pytest.mark.parametrize("seg_type", ["FRACTIONAL", "BINARY", "LABELMAP"])
def test_the_sr_from_the_seg_header_is_the_sr_from_the_whole_seg(seg_type: str, case: Any,
                                                                tmp_path: Path) -> None:
    ct, labels, vols = case
    deferred = build_seg_frames(ct, labels, vols, MODEL, seg_type=seg_type, defer_frames=True)
    if seg_type != "LABELMAP":  # the spliced SEGs: their frames not encoded yet
        assert PIXEL_DATA not in deferred.header and PER_FRAME not in deferred.header
    beside = build_measurement_sr(ct, deferred.header, vols, MODEL, frames=deferred.frames)
    whole = build_seg_frames(ct, labels, vols, MODEL, seg_type=seg_type)
    after = build_measurement_sr(ct, whole.dataset, vols, MODEL, frames=whole.frames)
    assert _bytes(beside, tmp_path / "beside.dcm") == _bytes(after, tmp_path / "after.dcm")
    seg_bytes = _bytes(whole.dataset, tmp_path / "seg.dcm")
    assert _bytes(deferred.dataset, tmp_path / "seg-deferred.dcm") == seg_bytes
    assert str(beside.SOPInstanceUID) == measurement_sr_uid(ct, vols, MODEL)


def _job(ct: Any, work: Path, handed_on: frozenset[Path], heard: list[Path]) -> JobInput:
    work.mkdir()
    return JobInput(job_id=1, series_instance_uid=str(ct.header.series_instance_uid),
                    files=list(ct.source_files), work_dir=work, outputs_in_outbox=handed_on,
                    output_ready=heard.append)


def _attempt(ct: Any, labels: Any, settings: Settings, work: Path,
             handed_on: frozenset[Path] = frozenset()) -> tuple[list[Path], list[Path]]:
    heard: list[Path] = []
    return report(_job(ct, work, handed_on, heard), settings, ct, labels, MODEL).outputs, heard


def _modality(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).Modality)


def test_the_node_builds_the_sr_in_a_child_and_hands_it_on_after_the_seg(case: Any, tmp_path: Path) -> None:
    """The node's SR (built by a child) and SEG equal those of the sequential build (``segment
    --dicom``) but for build times; the SEG is handed on first."""
    ct, labels, vols = case
    settings = Settings(storage_dir=tmp_path / "var", pairing={"retrieve_priors": False},
                        output={"summary": False})
    outputs, heard = _attempt(ct, labels, settings, tmp_path / "job")
    assert [_modality(p) for p in heard] == ["SEG", "SR"] and heard == outputs
    (span,) = [s for s in read_spans(tmp_path / "job") if s.phase == "SR encoding (background)"]
    assert span.pid != os.getpid()
    sequential = build_outputs(settings, ct, labels, vols, MODEL).datasets
    for path, ds in zip(outputs, sequential, strict=True):
        assert _without_build_times(pydicom.dcmread(path)) == _without_build_times(
            pydicom.dcmread(_save_here(ds, tmp_path / "sequential")))


def _save_here(ds: pydicom.Dataset, folder: Path) -> Path:
    from dicomnode.processing.pipeline import _save

    return _save(ds, folder)


def test_a_failed_sr_child_leaves_the_sr_to_the_parent(case: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import reporting.sr

    ct, labels, _ = case
    settings = Settings(storage_dir=tmp_path / "var", pairing={"retrieve_priors": False},
                        output={"summary": False})
    reference, _ = _attempt(ct, labels, settings, tmp_path / "reference")
    expected = {p.name: _without_build_times(pydicom.dcmread(p)) for p in reference}
    parent, builders = os.getpid(), []
    build = reporting.sr.build_measurement_sr

    def child_fails(*args: Any, **kwargs: Any) -> Any:
        if os.getpid() != parent:
            raise MemoryError("the child could not build the SR")
        builders.append("parent")
        return build(*args, **kwargs)

    monkeypatch.setattr(reporting.sr, "build_measurement_sr", child_fails)
    settings = Settings(storage_dir=tmp_path / "var2", pairing={"retrieve_priors": False},
                        output={"summary": False})
    settings.storage_dir.mkdir()  # the same node secret, so the same tracking UIDs (reporting.uids)
    shutil.copy(tmp_path / "var" / ".pseudonym-key", settings.storage_dir / ".pseudonym-key")
    outputs, heard = _attempt(ct, labels, settings, tmp_path / "job")
    assert builders == ["parent"] and [_modality(p) for p in heard] == ["SEG", "SR"]
    assert {p.name: _without_build_times(pydicom.dcmread(p)) for p in outputs} == expected


def test_a_rerun_checks_the_sr_in_the_child_and_hands_nothing_on_beside_a_changed_seg(
        case: Any, tmp_path: Path) -> None:
    """A re-run keeps an SR handed on before (checked by the child, not written again); when the SEG
    handed on before differs from its rebuild the job fails and the SR is not handed on."""
    ct, labels, _ = case
    settings = Settings(storage_dir=tmp_path / "var", pairing={"retrieve_priors": False},
                        output={"summary": False})
    outputs, _ = _attempt(ct, labels, settings, tmp_path / "first")
    seg, sr = outputs
    before = {p: p.read_bytes() for p in outputs}
    again, heard = _attempt(ct, labels, settings, tmp_path / "again", frozenset(outputs))
    assert again == outputs and heard == [] and {p: p.read_bytes() for p in outputs} == before

    changed = pydicom.dcmread(sr)
    changed.SeriesDescription = "other content"
    changed.save_as(sr, enforce_file_format=True)
    with pytest.raises(OutputChanged):  # the child's check failed, and so did the parent's
        _attempt(ct, labels, settings, tmp_path / "sr-changed", frozenset(outputs))
    assert pydicom.dcmread(sr).SeriesDescription == "other content"

    sr.write_bytes(before[sr])
    changed = pydicom.dcmread(seg)
    changed.SeriesDescription = "other content"
    changed.save_as(seg, enforce_file_format=True)
    sr.unlink()  # as if the first attempt ended before its SR was written: only the SEG handed on
    heard = []
    with pytest.raises(OutputChanged):
        report(_job(ct, tmp_path / "seg-changed", frozenset([seg]), heard), settings, ct, labels, MODEL)
    assert heard == []  # the SR built beside is not handed on


def test_after_the_warm_up_a_collection_in_a_forked_process_leaves_the_shared_pages_alone() -> None:
    """The warm-up freezes what it loaded (``_freeze_warm_objects``): a full garbage collection in a
    process that has forked a child then writes (copies) few of the pages the two share."""
    import subprocess
    import sys

    code = """
import gc, os, time
from dicomnode.processing import pipeline
import reporting.seg, reporting.sr, reporting.summary
pipeline._load_highdicom_tables()  # a heap like the warm pipeline process's

def faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])

def copied_by_a_collection():
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    before = faults()
    gc.collect()
    n = faults() - before
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return n

loose = copied_by_a_collection()
pipeline._freeze_warm_objects()
frozen = copied_by_a_collection()
print(loose, frozen)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loose, frozen = (int(v) for v in out.stdout.split())
    assert loose > 2000 and frozen * 5 < loose, (loose, frozen)
