"""``dicomnode segment --dicom`` writes the node's own SEG, SR and summary (same UIDs, valid DICOM);
``--batch`` measures every series of a folder into one CSV.

The model is replaced by the phantoms' true label maps: these tests are about the outputs, and the
node's pipeline gets the same stand-in, so any difference comes from the output path alone."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from stand_in_model import use_label_function
from test_reporting_seg import dciodvfy_errors
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.commands.segmentation import find_cases
from dicomnode.config import load_settings
from dicomnode.processing.pipeline import JobInput, _without_build_times, run_pipeline
from seg.phantom import PhantomOptions, make_phantom, write_phantom
from seg.records import CSV_COLUMNS, VolumeRecord
from seg.volume import Volume

SEEDS = (3, 4)
# pydicom warns as a test sets the invalid header values it is about
SETS_INVALID_VALUES = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> dict[str, Path]:
    """Two small phantoms, one folder each: SeriesInstanceUID → phantom folder (dicom/, truth/)."""
    root = tmp_path_factory.mktemp("segment_dicom")
    out = {}
    for seed in SEEDS:
        ph = make_phantom(PhantomOptions(seed=seed, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=(-60.0, 30.0)))
        write_phantom(ph, root / f"case{seed}")
        out[str(ph.header.series_instance_uid)] = root / f"case{seed}"
    assert len(out) == len(SEEDS)
    return out


@pytest.fixture
def truth_model(series, monkeypatch):
    """The model stand-in: each series' true label map."""
    from seg.io import load_nifti

    use_label_function(monkeypatch, lambda ct: load_nifti(
        series[str(ct.header.series_instance_uid)] / "truth" / "labels.nii.gz"))


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'storage_dir = "{tmp_path / "node"}"\n')
    return cfg


def _invoke(*args: str) -> str:
    r = CliRunner().invoke(app, ["segment", *args])
    assert r.exit_code == 0, r.output
    return r.output


def test_dicom_outputs_are_the_nodes(series, truth_model, tmp_path):
    """Same SOP Instance UIDs, classes and pixels as the node's pipeline, and dciodvfy finds no error."""
    uid, case = next(iter(series.items()))
    cfg = _config(tmp_path)
    printed = _invoke(str(case / "dicom"), "--out", str(tmp_path / "out"), "--dicom", "--no-progress",
                      "--config", str(cfg))
    files = sorted((tmp_path / "out" / "dicom").glob("*.dcm"))
    assert len(files) == 3 and (tmp_path / "out" / "volumes.csv").is_file()
    total = VolumeRecord.load(tmp_path / "out" / "volumes.json").by_name()["gluteus_maximus"].volume_cm3
    rows = [line for line in printed.splitlines() if line.startswith("Gluteus maximus ")]
    assert len(rows) == 1 and f"{total:.1f}" in rows[0]  # and the volumes are printed
    job = JobInput(job_id=1, series_instance_uid=uid, files=sorted((case / "dicom").glob("*")),
                   work_dir=tmp_path / "work")
    node = run_pipeline(job, load_settings(cfg)).outputs
    ours = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    theirs = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in node}
    assert sorted(ours) == sorted(theirs)
    for ds in ours.values():  # dated series: Orthanc Explorer listed them under "?"
        assert (ds.SeriesDate, ds.SeriesTime) == (ds.ContentDate, ds.ContentTime), ds.Modality
    for sop_uid, ds in ours.items():
        assert ds.SOPClassUID == theirs[sop_uid].SOPClassUID
        assert ds.SeriesInstanceUID == theirs[sop_uid].SeriesInstanceUID
        assert ds.get("PixelData") == theirs[sop_uid].get("PixelData")  # SEG frames, summary page
        # and every other element but the times of building (the node drafts its summary in a child)
        assert _without_build_times(ds) == _without_build_times(theirs[sop_uid])
    assert {str(ds.Modality) for ds in ours.values()} == {"SEG", "SR", "OT"}
    for f in files:
        assert dciodvfy_errors(f) == [], f


def _mixed_folder(series, folder: Path) -> Path:
    """Every series' files in one flat folder, as a PACS export might leave them."""
    folder.mkdir()
    for i, case in enumerate(series.values()):
        for f in (case / "dicom").glob("*"):
            shutil.copy(f, folder / f"{i}-{f.name}")
    return folder


def test_find_cases_groups_by_series_uid(series, tmp_path):
    """One sub-folder per series and a folder of mixed files give the same series."""
    mixed = _mixed_folder(series, tmp_path / "mixed")
    nested = tmp_path / "nested"
    for i, case in enumerate(series.values()):
        shutil.copytree(case / "dicom", nested / f"s{i}")
    for root in (mixed, nested):
        cases = find_cases(root)
        assert sorted(c.name for c in cases) == sorted(series)
        for c in cases:
            assert len(c.files) == len(list((series[c.name] / "dicom").glob("*")))


def test_batch_writes_one_csv_of_all_series(series, truth_model, tmp_path):
    """One row per series × structure, equal to each series' own volumes.csv, side volumes included."""
    mixed = _mixed_folder(series, tmp_path / "in")
    out = tmp_path / "out"
    _invoke(str(mixed), "--out", str(out), "--batch")
    with (out / "volumes.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert ["series", *CSV_COLUMNS] == list(rows[0])  # the side volumes included
    for uid in series:
        with (out / uid / "volumes.csv").open() as fh:
            own = list(csv.DictReader(fh))
        mine = [{k: v for k, v in r.items() if k != "series"} for r in rows if r["series"] == uid]
        assert mine == own and len(own) > 20
    assert len(rows) == sum(1 for r in rows if r["series"] in series)
    assert not (out / next(iter(series)) / "dicom").exists()  # DICOM outputs only with --dicom


def test_batch_record_pairs_archived_studies_for_the_reports(tmp_path, monkeypatch):
    """`segment --batch --record` (archived CTs, no PACS): each series is recorded in the node's index
    as the node records a job, so `report patient` and `report cohort` pair a patient's pre- and
    post-operative studies; the results stay in the node's storage."""
    from seg.io import load_nifti

    root, truth = tmp_path / "archive", {}
    for when, date, atrophy in (("pre", "20240101", {}), ("post", "20240601", {"sartorius": 0.7})):
        ph = make_phantom(PhantomOptions(seed=7, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=(-60.0, 30.0),
                                         patient_id="ARCH1", study_date=date, postop=bool(atrophy),
                                         atrophy=atrophy, implant_side="left" if atrophy else None))
        write_phantom(ph, tmp_path / when)
        shutil.copytree(tmp_path / when / "dicom", root / when)  # the archive holds the CT only
        truth[str(ph.header.series_instance_uid)] = tmp_path / when / "truth" / "labels.nii.gz"

    def segment(ct: Volume, model: object, progress: bool = False, precision: str | None = None) -> Volume:
        truth_labels = load_nifti(truth[str(ct.header.series_instance_uid)])
        return ct.with_array(np.asarray(truth_labels.array, np.uint8))

    monkeypatch.setattr("seg.infer.segment", segment)
    cfg = _config(tmp_path)
    (tmp_path / "registry.csv").write_text("patient_id,sex,fracture_type,fractured_side,surgery_date\n"
                                           "ARCH1,F,FNF,left,20240301\n")
    runner = CliRunner()
    assert runner.invoke(app, ["patients", "import", str(tmp_path / "registry.csv"), "--config", str(cfg)]
                         ).exit_code == 0
    _invoke(str(root), "--out", str(tmp_path / "out"), "--batch", "--record", "--no-progress",
            "--config", str(cfg))
    assert (tmp_path / "out" / "volumes.csv").is_file()
    outputs = {when: sorted((tmp_path / "node" / "results" / uid / "outputs").glob("*.dcm"))
               for when, uid in zip(("pre", "post"), truth, strict=True)}
    # the node's layout: results/<series>/ with its outputs; the follow-up's change SR too, whatever
    # the order of the series' UIDs (the archive is recorded in study order, as a node receives it)
    assert [len(outputs["pre"]), len(outputs["post"])] == [3, 4]
    followup = [ds for f in outputs["post"] if (ds := pydicom.dcmread(f)).Modality == "SR"
                and "change" in str(ds.get("SeriesDescription", "")).lower()]
    assert len(followup) == 1, [pydicom.dcmread(f).SeriesDescription for f in outputs["post"]]
    res = runner.invoke(app, ["report", "patient", "ARCH1", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if line.startswith("Sartorius "))
    assert float(row.split()[3]) == pytest.approx(30.0, abs=3.0)  # fractured side: loss % of 0.7 kept
    res = runner.invoke(app, ["report", "cohort", "--out", str(tmp_path / "cohort"), "--bootstrap", "20",
                              "--config", str(cfg)])
    assert res.exit_code == 0 and "Female FNF 1" in res.output, res.output


def test_segment_uses_the_configured_model(series, truth_model, tmp_path):
    """Without --model, `segment` measures with the configuration's model_path (file or
    DICOMNODE_MODEL_PATH), as the node would, with or without --dicom; not the demo model."""
    import json

    from seg.package import DEMO_DIR

    site = tmp_path / "site-model"
    shutil.copytree(DEMO_DIR, site)
    meta = json.loads((site / "model.json").read_text())
    (site / "model.json").write_text(json.dumps({**meta, "name": "site-test", "demo": False}))
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'storage_dir = "{tmp_path / "node"}"\nmodel_path = "{site}"\n')
    case = next(iter(series.values()))
    _invoke(str(case / "dicom"), "--out", str(tmp_path / "a"), "--no-progress", "--config", str(cfg))
    assert VolumeRecord.load(tmp_path / "a" / "volumes.json").model.name == "site-test"


def test_find_cases_skips_the_phantom_layouts_truth(series):
    """`dicomnode phantom`'s folder (dicom/ + truth/labels.nii.gz) is one series: its label map is not
    segmented as a CT."""
    root = next(iter(series.values())).parent
    assert sorted(c.name for c in find_cases(root)) == sorted(series)


def _nifti_dataset(series, root: Path) -> Path:
    """The training layout: case001/ct.nii.gz + labels.nii.gz, case002/ct.nii.gz + truth/labels.nii.gz."""
    from seg.io import load_image, save_nifti

    case = next(iter(series.values()))  # one CT twice: the stand-in model returns its truth for both
    for n in (1, 2):
        (root / f"case00{n}" / "truth").mkdir(parents=True)
        save_nifti(load_image(case / "dicom"), root / f"case00{n}" / "ct.nii.gz")
        where = "labels.nii.gz" if n == 1 else "truth/labels.nii.gz"
        shutil.copy(case / "truth" / "labels.nii.gz", root / f"case00{n}" / where)
    return root


def test_batch_keeps_niftis_of_one_name_apart(series, tmp_path, monkeypatch):
    """case001/ct.nii.gz and case002/ct.nii.gz are two cases in two folders (the second overwrote the
    first in out/ct/), and neither label map is measured as a case."""
    from seg.io import load_nifti

    root = _nifti_dataset(series, tmp_path / "dataset")
    truth = load_nifti(root / "case001" / "labels.nii.gz").array

    def segment(ct: Volume, model: object, progress: bool = False, precision: str | None = None) -> Volume:
        return ct.with_array(np.asarray(truth, np.uint8))

    monkeypatch.setattr("seg.infer.segment", segment)
    out = tmp_path / "out"
    printed = _invoke(str(root), "--out", str(out), "--batch", "--no-progress")
    assert "2 series measured, 0 skipped" in printed
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["case001_ct", "case002_ct"]
    with (out / "volumes.csv").open() as fh:
        assert {r["series"] for r in csv.DictReader(fh)} == {"case001_ct", "case002_ct"}


def test_batch_refuses_two_cases_for_one_folder(tmp_path, monkeypatch):
    """a_ct.nii.gz and a/ct.nii.gz would share out/a_ct/: refused before the model loads, nothing
    written."""
    def load_model(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the cases were checked")

    monkeypatch.setattr("seg.model.load_model", load_model)
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "a_ct.nii.gz").write_bytes(b"")
    (tmp_path / "in" / "a" / "ct.nii.gz").write_bytes(b"")
    r = CliRunner().invoke(app, ["segment", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--batch"],
                           env={"COLUMNS": "400"})
    assert r.exit_code == 2, r.output
    assert "a/ct.nii.gz and a_ct.nii.gz would both be written to <out>/a_ct" in " ".join(r.output.split())
    assert not (tmp_path / "out").exists()


def test_the_demo_models_banner_fits_80_columns(series, monkeypatch):
    """Two lines within 80 columns and no trailing space (it was one line of 94, folded by the
    terminal mid-sentence)."""
    from types import SimpleNamespace

    from seg.package import DEMO_STATEMENT
    from seg.records import ModelInfo

    info = ModelInfo(name="thigh-unetr-demo", version="0.9.0", demo=True, statement=DEMO_STATEMENT)
    monkeypatch.setattr("seg.model.load_model", lambda *_, **__: SimpleNamespace(info=info))
    monkeypatch.setattr("seg.runtime.prepare", lambda pkg, _: pkg)

    from dicomnode.commands.segmentation import CaseOutputError

    def run_case(*_: object, **__: object) -> None:
        raise CaseOutputError("stop after the banner")

    monkeypatch.setattr("dicomnode.commands.segmentation.run_case", run_case)
    case = next(iter(series.values()))
    r = CliRunner().invoke(app, ["segment", str(case / "dicom"), "--out", "unused", "--no-progress"])
    assert r.exit_code == 1 and "error: stop after the banner" in r.output
    banner = r.output[:r.output.index("error:")].splitlines()
    assert " ".join(" ".join(banner).split()) == f"model thigh-unetr-demo 0.9.0: {DEMO_STATEMENT}"
    assert all(len(line) <= 80 and line == line.rstrip() for line in banner), banner


def test_every_label_map_name_training_reads_is_skipped():
    """The names `train`/`evaluate` read as label maps (seg.dataset.LABEL_NAMES) are never batch cases."""
    from dicomnode.commands.segmentation import _is_label_map
    from seg.dataset import CT_NAMES, LABEL_NAMES

    assert all(_is_label_map(Path("case001") / name) for name in LABEL_NAMES)
    assert not any(_is_label_map(Path("case001") / name) for name in CT_NAMES)


def _outputs_of_edited(series, tmp_path: Path, edit) -> tuple[list[Path], pydicom.Dataset]:
    """The SEG, SR and summary `segment --dicom` writes for a copy of a series whose every header
    ``edit`` changed, and one edited source header."""
    case = tmp_path / "case"
    shutil.copytree(next(iter(series.values())) / "dicom", case)
    for f in case.glob("*"):
        ds = pydicom.dcmread(f)
        edit(ds)
        ds.save_as(f)
    _invoke(str(case), "--out", str(tmp_path / "out"), "--dicom", "--no-progress", "--config",
            str(_config(tmp_path)))
    files = sorted((tmp_path / "out" / "dicom").glob("*.dcm"))
    assert len(files) == 3
    return files, pydicom.dcmread(f)


@pytest.mark.parametrize(("charset", "name", "written_as", "same_bytes"), [
    # the usual Japanese and Korean forms (value 1 empty: the default repertoire, PS3.3 C.12.1.1.2)
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", ["ISO 2022 IR 6", "ISO 2022 IR 87"],
     True),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "ISO_IR 192", False),
    ("ISO 2022 IR 100", "Müller^Jörg", "ISO_IR 100", True),  # one code-extension term alone
])
def test_outputs_keep_the_patients_name_in_any_character_set(series, truth_model, tmp_path, charset, name,
                                                              written_as, same_bytes):
    """A study whose Specific Character Set highdicom refuses as written (an empty first value, the
    Korean term, a lone code-extension term) failed every output ("'' is not a valid
    SpecificCharacterSetValues"): the outputs now carry the same name under a declaration it takes."""
    def edit(ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name

    files, source = _outputs_of_edited(series, tmp_path, edit)
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.SpecificCharacterSet == written_as and str(ds.PatientName) == name, ds.Modality
        assert (ds.PatientName.original_string == source.PatientName.original_string) == same_bytes
        assert dciodvfy_errors(f) == [], f


@SETS_INVALID_VALUES
@pytest.mark.parametrize(("removed", "set_to", "empty"), [
    # what anonymisers and older modalities leave out (Type 2) and a CT without SliceThickness
    (("PatientSex", "PatientName", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "SliceThickness"),
     {}, ("PatientSex", "PatientName", "StudyDate", "StudyTime", "AccessionNumber", "StudyID")),
    # values that are not valid DICOM: emptied, not copied, as highdicom cannot take them
    # and a PatientAge without its unit (Type 3: left out; copied, it failed dciodvfy in every output)
    ((), {"PatientBirthDate": "00000000", "StudyTime": "12:00:00", "PatientSex": "X", "PatientAge": "65"},
     ("PatientBirthDate", "StudyTime", "PatientSex")),
])
def test_outputs_are_built_from_a_loose_header(series, truth_model, tmp_path, removed, set_to, empty):
    """Each of these raised in highdicom after the whole inference (AttributeError, "year 0 is out of
    range"), so no SEG, SR or summary, and the node ran the model again on every retry."""
    def edit(ds: pydicom.Dataset) -> None:
        for keyword in removed:
            delattr(ds, keyword)
        for keyword, value in set_to.items():
            setattr(ds, keyword, value)

    files, _ = _outputs_of_edited(series, tmp_path, edit)
    for f in files:
        ds = pydicom.dcmread(f)
        assert all(keyword in ds and ds[keyword].value in (None, "") for keyword in empty), ds.Modality
        assert ("PatientAge" in ds) == ("PatientAge" not in set_to)
        if ds.Modality == "SEG":  # the slice spacing the loader measured, when the CT has no thickness
            measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
            assert float(measures.SliceThickness) == pytest.approx(3.0)
        assert dciodvfy_errors(f) == [], f


@SETS_INVALID_VALUES
def test_an_invalid_identity_value_is_named_in_the_log_but_not_shown(caplog):
    from pydicom.dataset import Dataset

    from reporting.source_header import buildable

    ds = Dataset()
    ds.PatientBirthDate, ds.PatientName = "1940", "Doe^Jane"
    with caplog.at_level("WARNING", logger="reporting.source_header"):
        buildable(ds)
    assert ds.PatientBirthDate in (None, "") and ds.PatientName == "Doe^Jane" and ds.PatientSex in (None, "")
    ours = " ".join(r.getMessage() for r in caplog.records if r.name == "reporting.source_header")
    assert "PatientBirthDate" in ours and "1940" not in ours


@SETS_INVALID_VALUES
def test_a_repair_is_said_once_for_the_series(series, tmp_path, caplog):
    """Once per series, not once per slice (208 warnings for one 206-slice series)."""
    from reporting.source_header import read_source_headers

    files = sorted((next(iter(series.values())) / "dicom").glob("*"))
    with caplog.at_level("WARNING", logger="reporting.source_header"):  # a good header: left as it is
        clean = read_source_headers(files[:1])[0]
    assert not caplog.records and clean == pydicom.dcmread(files[0], stop_before_pixels=True)
    copies = []
    for i, f in enumerate(files[:3]):
        ds = pydicom.dcmread(f)
        ds.PatientBirthDate = "00000000"
        copies.append(tmp_path / f"{i}.dcm")
        ds.save_as(copies[-1])
    with caplog.at_level("WARNING", logger="reporting.source_header"):
        headers = read_source_headers(copies)
    assert all(h.PatientBirthDate in (None, "") for h in headers)
    assert len([r for r in caplog.records if r.name == "reporting.source_header"]) == 1


def test_an_output_that_cannot_be_written_is_no_usage_error(series, truth_model, tmp_path, monkeypatch):
    """The CT was read and segmented: a results folder that cannot be made, or outputs the header
    cannot make, end with exit 1 and say so, not typer's "Invalid value for INPUT" (which sent the
    user to check a CT that was fine)."""
    case = next(iter(series.values()))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    r = CliRunner().invoke(app, ["segment", str(case / "dicom"), "--out", str(blocked / "out"),
                                 "--no-progress"], env={"COLUMNS": "400"})
    assert r.exit_code == 1, r.output
    assert "cannot write the results to" in r.output and "Invalid value" not in r.output

    def build_outputs(*_: object, **__: object) -> None:
        raise ValueError("a header the SR cannot carry")

    monkeypatch.setattr("dicomnode.processing.pipeline.build_outputs", build_outputs)
    r = CliRunner().invoke(app, ["segment", str(case / "dicom"), "--out", str(tmp_path / "out"), "--dicom",
                                 "--no-progress", "--config", str(_config(tmp_path))],
                           env={"COLUMNS": "400"})
    assert r.exit_code == 1, r.output
    assert "not the SEG, SR and summary: ValueError: a header the SR cannot carry" in r.output
    assert "Invalid value" not in r.output
    assert (tmp_path / "out" / "volumes.json").is_file()  # what could be written is kept


def test_tracking_uids_do_not_reveal_the_patient_id(series, truth_model, tmp_path):
    """A tracking UID was a plain uuid5 of the PatientID: hashing every plausible MRN finds the patient
    of any export that keeps UIDs. It is keyed by the node's secret now: the same in the SEG and SR,
    different from the plain hash, and different on a node with another secret."""
    from reporting.uids import derived_uid
    from seg.labels import ANALYSED_MUSCLES

    case = next(iter(series.values()))
    found = []
    for node in ("a", "b"):
        cfg = tmp_path / f"{node}.toml"
        cfg.write_text(f'storage_dir = "{tmp_path / node}"\n')
        out = tmp_path / f"out-{node}"
        _invoke(str(case / "dicom"), "--out", str(out), "--dicom", "--no-progress", "--config", str(cfg))
        by_kind = {str(ds.Modality): ds for f in (out / "dicom").glob("*.dcm") if (ds := pydicom.dcmread(f))}
        seg_uids = {str(s.TrackingUID) for s in by_kind["SEG"].SegmentSequence}
        sr_uids = {str(e.value) for e in by_kind["SR"].iterall() if e.keyword == "UID"}
        assert seg_uids and seg_uids <= sr_uids  # one subject for the SEG and the SR
        found.append(seg_uids)
        patient_id = str(by_kind["SEG"].PatientID)
        plain = {derived_uid("tracking", patient_id, name, side) for name in ANALYSED_MUSCLES
                 for side in ("left", "right", "both")}
        assert not seg_uids & plain
    assert not found[0] & found[1]  # another node's secret: other tracking UIDs
