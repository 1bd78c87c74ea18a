"""``dicomnode segment --record`` (offline, nothing sent) leaves in the node's storage what the node's
own job path leaves there, follow-up included: the same files under ``results/`` (the SEG, SR and
summary, the change SR, the comparison page, the change record), byte for byte but for the times
of building, and the same pairing rows.

The model is replaced by each phantom's true label map in both paths, so any difference comes from
what follows the measurement.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pydicom
import pytest
from stand_in_model import use_label_function
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import load_settings
from dicomnode.processing.pipeline import JobInput, _without_build_times, run_pipeline
from dicomnode.processing.sources import SOURCE_FILE
from seg.phantom import PhantomOptions, make_phantom, write_phantom

REGISTRY = ("patient_id,sex,fracture_type,fractured_side,surgery_date\n"
            "REC1,F,FNF,left,20240301\n")
STUDIES = (("pre", "20240101", {}), ("post", "20240601", {"sartorius": 0.7}))


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """A patient's pre- and post-operative phantom CTs: time point → (SeriesInstanceUID, folder)."""
    root = tmp_path_factory.mktemp("segment_record")
    out = {}
    for when, date, atrophy in STUDIES:
        ph = make_phantom(PhantomOptions(seed=7, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=(-45.0, 15.0),
                                         patient_id="REC1", study_date=date, postop=bool(atrophy),
                                         atrophy=atrophy, implant_side="left" if atrophy else None))
        write_phantom(ph, root / when)
        out[when] = (str(ph.header.series_instance_uid), root / when)
    return out


@pytest.fixture
def truth_model(studies, monkeypatch):
    """The model stand-in: each series' true label map."""
    from seg.io import load_nifti

    by_uid = {uid: folder for uid, folder in studies.values()}
    use_label_function(monkeypatch, lambda ct: load_nifti(
        by_uid[str(ct.header.series_instance_uid)] / "truth" / "labels.nii.gz"))


def _node(tmp_path: Path, name: str, key: bytes) -> Path:
    """A node configuration with the registry imported and the given tracking secret."""
    storage = tmp_path / name
    storage.mkdir()
    (storage / ".pseudonym-key").write_bytes(key)
    (storage / ".pseudonym-key").chmod(0o600)
    cfg = tmp_path / f"{name}.toml"
    # offline, nothing asks a PACS for priors: neither does the node here
    cfg.write_text(f'storage_dir = "{storage}"\n[pairing]\nretrieve_priors = false\n')
    (tmp_path / "registry.csv").write_text(REGISTRY)
    r = CliRunner().invoke(app, ["patients", "import", str(tmp_path / "registry.csv"), "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    return cfg


def _dicom_files(folder: Path) -> list[Path]:
    return sorted((folder / "dicom").glob("*"))


def _held(storage: Path) -> dict[str, object]:
    """What the storage holds of the results: each file under results/ (DICOM: its content without
    the times of building; the label map: present) and the pairing rows without paths and times."""
    held: dict[str, object] = {}
    for f in sorted((storage / "results").rglob("*")):
        if not f.is_file() or f.name == SOURCE_FILE:  # offline only: where its CT was read from
            continue
        rel = f.relative_to(storage / "results").as_posix()
        held[rel] = (_without_build_times(pydicom.dcmread(f)) if f.suffix == ".dcm"
                     else f.read_text() if f.suffix in (".json", ".csv") else "present")
    con = sqlite3.connect(storage / "index.sqlite")
    try:
        held["pairing_results"] = con.execute(
            "SELECT patient_id, study_instance_uid, series_instance_uid, seg_sop_instance_uid,"
            " sr_sop_instance_uid FROM pairing_results ORDER BY series_instance_uid").fetchall()
        held["pairing_status"] = con.execute(
            "SELECT series_instance_uid, role, reasons FROM pairing_status ORDER BY 1").fetchall()
        held["pairing_changes"] = con.execute(
            "SELECT baseline_series_uid, followup_series_uid FROM pairing_changes ORDER BY 1, 2").fetchall()
    finally:
        con.close()
    return held


def _described(held: dict[str, object], other: dict[str, object]) -> list[str]:
    """The entries of ``held`` that ``other`` lacks, each with what it is (modality, description)."""
    return [f"{name} {getattr(ds, 'Modality', '')} {getattr(ds, 'SeriesDescription', '')}"
            for name, ds in held.items() if name not in other]


def _by_node(cfg: Path, studies: dict[str, tuple[str, Path]], order: list[str], work: Path) -> None:
    """The node's job path for each study in ``order``, the CTs in its store."""
    settings = load_settings(cfg)
    files = {uid: _dicom_files(folder) for uid, folder in studies.values()}
    for n, when in enumerate(order, start=1):
        uid, folder = studies[when]
        run_pipeline(JobInput(job_id=n, series_instance_uid=uid, files=files[uid], work_dir=work / str(n),
                              series_files=lambda u: files.get(u, [])), settings)


@pytest.mark.parametrize("order", [["pre", "post"], ["post", "pre"]], ids=["in-order", "late-baseline"])
def test_record_one_series_at_a_time_leaves_what_the_node_leaves(studies, truth_model, tmp_path, order):
    """`segment CT --record`, one study per run (the baseline first, or after its follow-up), leaves
    the follow-up's change SR and comparison page (with the baseline's key images) where the node's
    job path does, under the same UIDs."""
    key = bytes(range(32))
    node_cfg, offline_cfg = _node(tmp_path, "node", key), _node(tmp_path, "offline", key)
    _by_node(node_cfg, studies, order, tmp_path / "work")
    for when in order:
        r = CliRunner().invoke(app, ["segment", str(studies[when][1] / "dicom"), "--record",
                                     "--no-progress", "--config", str(offline_cfg)])
        assert r.exit_code == 0, r.output
    node, offline = _held(tmp_path / "node"), _held(tmp_path / "offline")
    assert _described(offline, node) == _described(node, offline)
    for name in node:
        assert offline[name] == node[name], name
    # the follow-up's results: SEG, SR, first page, change SR (+ the page with the comparison, which
    # replaces the first when the baseline came later), and the change record
    post = studies["post"][0]
    outputs = [n for n in node if n.startswith(f"{post}/outputs/")]
    assert len(outputs) == (4 if order[0] == "pre" else 5), outputs
    assert f"{post}/change-{studies['pre'][0]}.json" in node


def test_batch_record_leaves_what_the_node_leaves(studies, truth_model, tmp_path):
    """`segment ARCHIVE --batch --record` of a patient's two studies: the node's results, the
    comparison page with the baseline's key images included (no --out: no volumes.csv)."""
    key = bytes(range(32))
    node_cfg, offline_cfg = _node(tmp_path, "node", key), _node(tmp_path, "offline", key)
    _by_node(node_cfg, studies, ["pre", "post"], tmp_path / "work")
    archive = tmp_path / "archive"
    for when, (_, folder) in studies.items():
        shutil.copytree(folder / "dicom", archive / when)
    r = CliRunner().invoke(app, ["segment", str(archive), "--batch", "--record", "--no-progress",
                                 "--config", str(offline_cfg)])
    assert r.exit_code == 0, r.output
    assert "2 series measured, 0 skipped\n" in r.output
    node, offline = _held(tmp_path / "node"), _held(tmp_path / "offline")
    assert _described(offline, node) == _described(node, offline)
    for name in node:
        assert offline[name] == node[name], name


def test_record_says_where_the_outputs_are_and_keeps_what_a_uid_named(studies, truth_model, tmp_path):
    """Offline nothing is sent: the command names the folder of the outputs. Recorded again, an
    object whose file under its UID holds other content (as if the node had sent another build) is
    not overwritten: the run fails with exit 1 and the file stays as it was."""
    cfg = _node(tmp_path, "offline", bytes(range(32)))
    uid, folder = studies["pre"]
    args = ["segment", str(folder / "dicom"), "--record", "--no-progress", "--config", str(cfg)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    outputs = tmp_path / "offline" / "results" / uid / "outputs"
    assert f"nothing sent); DICOM outputs in\n{outputs}\n" in first.output
    seg = next(f for f in outputs.glob("*.dcm") if pydicom.dcmread(f).Modality == "SEG")
    ds = pydicom.dcmread(seg)
    ds.SeriesDescription = "another build"
    ds.save_as(seg, enforce_file_format=True)
    before = seg.read_bytes()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "OutputChanged" in again.output, again.output
    assert seg.read_bytes() == before


def test_a_baseline_measured_by_an_earlier_model_is_named_until_it_is_measured_again(studies, truth_model,
                                                                                   tmp_path):
    """After a change of model (a site's model, or a new release of the shipped one) the follow-up's
    comparison says that its baseline was measured by another model; `segment --record` of the
    baseline with the node's model (pacs-admin.md §6) measures it again and the note goes."""
    import json

    from seg.package import DEMO_DIR

    cfg = _node(tmp_path, "offline", bytes(range(32)))
    newer = tmp_path / "site-model"
    shutil.copytree(DEMO_DIR, newer)
    meta = json.loads((newer / "model.json").read_text())
    old_version, meta["version"] = meta["version"], meta["version"] + "-site"
    (newer / "model.json").write_text(json.dumps(meta))

    def record(when: str, *model: str) -> None:
        r = CliRunner().invoke(app, ["segment", str(studies[when][1] / "dicom"), "--record", "--no-progress",
                                     "--config", str(cfg), *model])
        assert r.exit_code == 0, r.output

    def report() -> str:
        r = CliRunner().invoke(app, ["report", "patient", "REC1", "--config", str(cfg)])
        assert r.exit_code == 0, r.output
        return " ".join(r.output.split())

    record("pre")
    record("post", "--model", str(newer))
    said = (f"Baseline measured by model {meta['name']} {old_version}, follow-up by {meta['version']}: part "
            "of the change may be the models' difference")
    assert said in report()
    record("pre", "--model", str(newer))
    again = report()
    assert "measured by model" not in again and "the 21 analysed muscles, both sides" in again


@pytest.mark.parametrize("args", [["--record", "--out", "unused"], []], ids=["record-one-series", "neither"])
def test_out_is_given_where_something_is_written_to_it(studies, tmp_path, monkeypatch, args):
    """--record keeps one series' results in the node's storage: an --out beside it is refused
    (taken and ignored, it would hide where they went); without --record --out is needed. Both
    before anything is read or written."""
    cfg = _node(tmp_path, "offline", bytes(range(32)))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["segment", str(studies["pre"][1] / "dicom"), *args, "--no-progress",
                                 "--config", str(cfg)], env={"COLUMNS": "400"})
    assert r.exit_code == 2 and "Invalid value for --out" in r.output, r.output
    assert not (tmp_path / "unused").exists() and not (tmp_path / "offline" / "results").exists()


def test_lookup_refuses_recorded_files_that_hold_another_series_now(studies, tmp_path, caplog):
    """The files ``source.json`` names are the recorded series' CT only while they hold that series
    (an archive folder rewritten since must not put another CT in its report); a source.json that
    cannot be read gives none either. The warnings name no path (the archive's folders may carry the
    patient's name); the series at hand in a run comes first."""
    import logging

    from dicomnode.processing.sources import SeriesLookup, remember_source

    (pre_uid, pre), (_, post) = studies["pre"], studies["post"]
    results = tmp_path / "results"
    lookup = SeriesLookup(tmp_path / "no-index.sqlite", results)
    remember_source(results / pre_uid, _dicom_files(pre))
    assert lookup(pre_uid) == [f.resolve() for f in _dicom_files(pre)]
    at_hand = SeriesLookup(tmp_path / "no-index.sqlite", results, {pre_uid: _dicom_files(post)})
    assert at_hand(pre_uid) == _dicom_files(post)
    caplog.set_level(logging.DEBUG, logger="dicomnode.processing.sources")
    remember_source(results / pre_uid, _dicom_files(post))  # the folder now holds the other series
    assert lookup(pre_uid) == []
    (results / pre_uid / SOURCE_FILE).write_text('{"files": "' + str(pre) + '"}')
    assert lookup(pre_uid) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"series {pre_uid}: the files it was recorded from hold another series now",
                        f"series {pre_uid}: its {SOURCE_FILE} cannot be read"]
    # pydantic's text quotes the paths it refused: at DEBUG only
    assert any(r.levelno == logging.DEBUG and "input_value=" in r.getMessage() for r in caplog.records)


def test_a_recorded_ct_that_cannot_be_decoded_is_named_by_its_series_not_its_file(studies, tmp_path,
                                                                                   caplog):
    """An archive's file names can carry the patient's name: when a slice of a series recorded
    offline cannot be decoded as the node reads it for another study's report, the warning names the
    series and the transfer syntax, and the file's name is logged at DEBUG only."""
    import logging

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    from dicomnode.config import Settings
    from dicomnode.processing.pipeline import results_dir, stored_study
    from dicomnode.processing.sources import SeriesLookup, remember_source

    pre_uid, pre = studies["pre"]
    (tmp_path / "archive").mkdir()
    files = [Path(shutil.copy(f, tmp_path / "archive" / f"DOE_JANE_{n:04d}.dcm"))
             for n, f in enumerate(_dicom_files(pre))]
    ds = pydicom.dcmread(files[1])
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\0" * 64])  # no JPEG-LS stream: no decoder reads it
    ds["PixelData"].VR = "OB"
    ds.save_as(files[1])
    settings = Settings(storage_dir=tmp_path / "node")
    remember_source(results_dir(settings, pre_uid), files)
    job = JobInput(job_id=5, series_instance_uid="1.2.3", files=[], work_dir=tmp_path / "work",
                   series_files=SeriesLookup.of(settings))
    caplog.set_level(logging.DEBUG, logger="dicomnode.processing.pipeline")
    assert stored_study(settings, job, pre_uid) is None
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [m for m in shown if "DOE_JANE" in m], shown
    assert [m for r in caplog.records if r.name == "dicomnode.processing.pipeline"
            and r.levelno >= logging.INFO and (m := r.getMessage())] == [
        f"job 5: no baseline key images of series {pre_uid}: PixelDecodeError: a slice's pixel"
        " data (JPEG-LS Lossless Image Compression) cannot be decoded (its file is named at DEBUG)"]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(files[1].name in m for m in debug), debug
