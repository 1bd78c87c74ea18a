"""A site dataset in its own label numbering (labels.csv): read into our classes in one place, for
`train --data`, `train --check` and `evaluate --data` alike; every value it does not explain refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from seg import labels as L
from seg.dataset import DatasetError, dataset_cases, load_case

RUNNER = CliRunner()
EXTRA = 900  # a structure the site labels and we do not model (a kidney, say)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from seg.phantom import PhantomOptions, make_phantom, write_phantom

    out = tmp_path_factory.mktemp("ph")
    write_phantom(make_phantom(PhantomOptions(seed=5, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-20, 20))), out)
    return out


def site_values(label: int, right: bool) -> int:
    """The site's numbering: each of our structures as a right and a left class (TotalSegmentator
    style), background 0."""
    return 0 if label == 0 else 100 + 2 * label + (0 if right else 1)


def table_text(psoas: str = "background") -> str:
    """labels.csv for :func:`site_values`; the site's psoas read as ``psoas``."""
    rows = ["value,structure", "0,background", f"{EXTRA},background"]
    for s in L.structures()[1:]:
        name = psoas if s.name == "psoas" else s.name
        rows += [f"{site_values(s.label, True)},{name}", f"{site_values(s.label, False)},{name}"]
    return "\n".join(rows) + "\n"


def site_case(phantom: Path, root: Path, name: str, extra_value: int = EXTRA) -> np.ndarray:
    """A case folder whose label map is the phantom's truth in the site's numbering, with a few
    background voxels labelled ``extra_value``; returns the truth in our classes."""
    from seg.io import load_nifti, save_nifti
    from seg.volume import Volume

    truth = load_nifti(phantom / "truth" / "labels.nii.gz")
    ours = np.asarray(truth.array, np.int16)
    site = np.zeros_like(ours)
    half = ours.shape[0] // 2
    for label in np.unique(ours):
        site[:half][ours[:half] == label] = site_values(int(label), True)
        site[half:][ours[half:] == label] = site_values(int(label), False)
    site[0, 0, :] = extra_value
    (root / name).mkdir(parents=True)
    (root / name / "dicom").symlink_to(phantom / "dicom")
    save_nifti(Volume(site, truth.affine), root / name / "labels.nii.gz")
    return ours


def test_site_numbering_is_read_into_our_classes_and_a_changed_table_is_cached_again(
        phantom: Path, tmp_path: Path) -> None:
    """Left and right classes become one structure, values mapped to background become background,
    and training's cache is made again when labels.csv changes (not trained on the old reading)."""
    from seg.train import TrainConfig, build_cache, preprocess_config

    data = tmp_path / "data"
    ours = site_case(phantom, data, "a")
    (data / "labels.csv").write_text(table_text())
    (case,) = dataset_cases(data).cases
    _, labels = load_case(case)
    want = np.where(ours == L.LABEL_OF["psoas"], 0, ours)
    assert (ours == L.LABEL_OF["psoas"]).any() and np.array_equal(labels.array, want)

    cfg = TrainConfig(out=str(tmp_path / "pkg"), checkpoint_dir=str(tmp_path / "ck"), data=str(data),
                      targets="nearest", name="site", version="0.0.1")
    train_cases, _, prov = build_cache(cfg, preprocess_config(cfg))
    assert L.LABEL_OF["psoas"] not in np.load(train_cases[0]["labels"])
    assert prov["label_table"][str(site_values(3, False))] == "vastus_lateralis"
    (data / "labels.csv").write_text(table_text(psoas="psoas"))
    train_cases, _, _ = build_cache(cfg, preprocess_config(cfg))
    assert L.LABEL_OF["psoas"] in np.load(train_cases[0]["labels"])


def test_train_check_names_the_table_and_what_it_leaves_unmapped(phantom: Path, tmp_path: Path) -> None:
    """`train --check` says the table was used and which structures no value maps to; a value the
    table lacks is that case's problem, naming the value, the label map and the table."""
    data = tmp_path / "data"
    site_case(phantom, data, "a")
    site_case(phantom, data, "b", extra_value=777)
    (data / "labels.csv").write_text(table_text())
    result = RUNNER.invoke(app, ["train", "--data", str(data), "--check", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    text = " ".join(result.output.split())
    assert ("Label values read through the dataset's labels.csv: 56 values onto 28 of our 29 "
            "structures, 4 to background. No value maps to: Psoas.") in text
    assert "b label values 777 in b/labels.nii.gz are not in labels.csv: add a row for each" in text
    assert "2 cases checked, 1 would stop training: b" in text


@pytest.mark.parametrize(("edit", "why"), [
    (lambda t: t.replace(",vastus_lateralis", ",vastus_lateral", 1),
     "line 8: unknown structure 'vastus_lateral' (the name column of seg/structures.csv, or "
     "background); did you mean vastus_lateralis?"),
    (lambda t: t + "106,sartorius\n",
     "line 62: value 106 is given twice (line 8 too); each value is one structure"),
    (lambda t: t + "-4,background\n", "line 62: value '-4' is not a whole number >= 0"),
    (lambda t: t + "5\n", "line 62: 1 cell(s), not 2 (value,structure)"),
    (lambda t: t.replace("value,structure", "label,name"), "the first line must be value,structure"),
    # Excel's CSV where the decimal separator is a comma: told apart, with the fix
    (lambda t: t.replace(",", ";"), "separated by ';' (as Excel saves CSV in some languages); "
     "separate by commas: the first line must be value,structure"),
])
def test_a_table_that_does_not_say_what_a_value_is_stops_every_command(
        phantom: Path, tmp_path: Path, edit, why: str) -> None:
    """Unknown structure names, a value given twice, a value that is no label, another header (one
    separated by semicolons named as such): the dataset is refused before any case is read, naming
    the file and the line, by all three commands."""
    data = tmp_path / "data"
    site_case(phantom, data, "a")
    (data / "labels.csv").write_text(edit(table_text()))
    with pytest.raises(DatasetError) as exc:
        dataset_cases(data)
    assert str(exc.value) in (f"{data / 'labels.csv'}: {why}", f"{data / 'labels.csv'} {why}")
    for args in (["train", "--data", str(data), "--check", "--no-progress"],
                 ["evaluate", "--data", str(data)]):
        result = RUNNER.invoke(app, args)
        assert result.exit_code == 2 and "Invalid value for --data" in result.output, result.output


def test_evaluate_data_reads_the_site_numbering_and_each_ct_once(
        phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluate --data` on a dataset in the site's numbering gives the figures of the same cases in
    ours, and reads each case's CT once (it checks every label map against the CT's grid first)."""
    import seg.io

    ours_root, site_root = tmp_path / "ours", tmp_path / "site"
    (ours_root / "a").mkdir(parents=True)
    (ours_root / "a" / "dicom").symlink_to(phantom / "dicom")
    (ours_root / "a" / "labels.nii.gz").symlink_to(phantom / "truth" / "labels.nii.gz")
    site_case(phantom, site_root, "a")
    (site_root / "labels.csv").write_text(table_text(psoas="psoas"))
    read = []
    real = seg.io.load_dicom_series

    def counted(paths: Path | list[Path]):
        read.append(Path(paths).resolve())
        return real(paths)

    monkeypatch.setattr(seg.io, "load_dicom_series", counted)
    figures = {}
    for root in (ours_root, site_root):
        read.clear()
        out = tmp_path / f"eval-{root.name}"
        result = RUNNER.invoke(app, ["evaluate", "--data", str(root), "--out", str(out), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert len(read) == 1, read  # once: not for the check before the inference as well
        ev = json.loads((out / "evaluation.json").read_text())
        assert ev["cases"] == 1 and "psoas" in ev["per_class"]
        figures[root.name] = {k: (v["dice"], v["volume_error_pct"]) for k, v in ev["per_class"].items()}
    assert figures["site"] == figures["ours"]
