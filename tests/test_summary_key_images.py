"""Key images on the summary page: three axial levels and a coronal view of the CT with the
segmentation in the SEG's colours and a legend; for a follow-up, pre above post with the operated
side marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reporting.summary import (
    KEY_LEVELS,
    OVERLAY_ALPHA,
    KeyStudy,
    coronal_row,
    key_images_figure,
    key_images_size,
    key_slices,
    overlay_rgb,
    rasterise,
    render_page,
    summary_pixels,
)
from seg.labels import structures
from seg.phantom import PhantomOptions, make_phantom, write_phantom
from seg.records import ModelInfo
from seg.volume import Volume

MODEL = ModelInfo(name="unetr-test", version="9.9", demo=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Volume, Volume]:
    """A small phantom read back from DICOM, with its true label map on the CT grid."""
    from seg.io import load_dicom_series, load_nifti

    root: Path = tmp_path_factory.mktemp("keyimg")
    write_phantom(make_phantom(PhantomOptions(seed=3, spacing_mm=(3.0, 3.0, 3.0),
                                              z_range_mm=(-60.0, 30.0))), root)
    ct = load_dicom_series(root / "dicom")
    lab = load_nifti(root / "truth" / "labels.nii.gz")
    return ct, ct.with_array(np.asarray(lab.array, dtype=np.uint8))


def _interior_voxel(lab2d: np.ndarray) -> tuple[int, int, int]:
    """(row, column, label) of a pixel deep inside the largest structure of a plane."""
    values, counts = np.unique(lab2d[lab2d > 0], return_counts=True)
    label = int(values[np.argmax(counts)])
    m = lab2d == label
    inner = m.copy()
    for dr in (-2, -1, 0, 1, 2):
        for dc in (-2, -1, 0, 1, 2):
            inner &= np.roll(np.roll(m, dr, axis=0), dc, axis=1)
    rows, cols = np.nonzero(inner)
    return int(rows[0]), int(cols[0]), label


def test_overlay_blends_the_seg_colour(study):
    ct, labels = study
    k = key_slices(labels)[1][1]
    ct2d, lab2d = ct.array[:, :, k].T, labels.array[:, :, k].T
    r, c, label = _interior_voxel(lab2d)
    grey = np.clip((float(ct2d[r, c]) + 160.0) / 400.0, 0, 1) * 255.0
    want = (1 - OVERLAY_ALPHA) * grey + OVERLAY_ALPHA * np.array(structures()[label].rgb)
    assert np.abs(overlay_rgb(ct2d, lab2d)[r, c].astype(float) - want).max() <= 1.0
    assert (overlay_rgb(ct2d, np.zeros_like(lab2d))[r, c] == round(grey)).all()  # no label: CT only


def test_key_images_show_levels_and_structure_colour(study):
    """Four panels (hip, mid-thigh, distal thigh, coronal); the rasterised pixel at a known structure
    location carries that structure's blended colour; the legend names what is shown."""
    ct, labels = study
    fig = key_images_figure([KeyStudy(ct, labels, "20240101")])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [name for name, _ in KEY_LEVELS] + ["coronal"]
    ks = [k for _, k in key_slices(labels)]
    assert ks == sorted(ks, reverse=bool(labels.affine[2, 2] > 0))  # hip first: cranial to caudal
    ax = fig.axes[1]
    lab2d = labels.array[:, :, ks[1]].T
    r, c, label = _interior_voxel(lab2d)
    px = rasterise(fig)
    assert px.shape[:2] == key_images_size(1)
    x, y = ax.transData.transform((c, r))
    got = px[int(round(px.shape[0] - y)), int(round(x))].astype(float)
    want = overlay_rgb(ct.array[:, :, ks[1]].T, lab2d)[r, c].astype(float)
    assert np.abs(got - want).max() <= 3.0, (got, want, structures()[label].name)
    planes = [labels.array[:, :, k] for k in ks] + [labels.array[:, coronal_row(labels), :]]
    shown = {int(v) for plane in planes for v in np.unique(plane)}
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == [s.display_name for s in structures() if s.label in shown and s.label > 0]
    assert structures()[label].display_name in texts and "Femur" in texts


def test_summary_page_has_key_images_below_the_table(study):
    ct, labels = study
    from seg.measure import measure_volumes

    vols = measure_volumes(labels, ct, model=MODEL)
    page = render_page(vols, MODEL, ct.header)
    px = summary_pixels(ct, vols, MODEL, labels=labels)
    rows, cols = key_images_size(1)
    assert px.shape == (page.shape[0] + rows, cols, 3) and cols == page.shape[1]
    assert (px[: page.shape[0]] == page).all()
    assert summary_pixels(ct, vols, MODEL).shape == page.shape  # no label map: the table alone


def test_follow_up_shows_pre_and_post_with_operated_side(study):
    ct, labels = study
    change = {"fractured_side": "right", "baseline": {"study_date": "20230101"}, "structures": []}
    from reporting.summary import _key_studies

    studies = _key_studies(ct, labels, change, baseline=(ct, labels))
    assert [s.caption.split()[0] for s in studies] == ["pre", "post"]
    fig = key_images_figure(studies, operated_side="right")
    assert len(fig.axes) == 8 and rasterise(fig).shape[:2] == key_images_size(2)
    marks = [t for ax in fig.axes for t in ax.texts if "operated" in t.get_text()]
    assert len(marks) == 2 * len(KEY_LEVELS)  # every axial panel of both rows
    # patient's right: image left when the columns run towards the patient's left (+x, LPS)
    image_left = ct.affine[0, 0] > 0
    assert all((t.get_position()[0] < 0.5) == image_left for t in marks)
    assert all("right" in t.get_text() for t in marks)


# -- the node's follow-up summary: pre and post from the stored job folders ---------------------------
FOLLOW_PATIENT = "KEYIMG-FU-1"
LOST = ("vastus_lateralis", "left")  # a side the follow-up's label map has lost, so pre and post differ


def _write_study(root: Path, study_date: str, name: str) -> tuple[list[Path], Volume, Volume]:
    from reporting.uids import derived_uid
    from seg.io import load_dicom_series, load_nifti

    write_phantom(make_phantom(PhantomOptions(
        seed=3, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=(-60.0, 30.0), patient_id=FOLLOW_PATIENT,
        study_date=study_date, study_uid=derived_uid("keyimg", name, "study"),
        series_uid=derived_uid("keyimg", name, "series"))), root)
    files = sorted((root / "dicom").glob("*.dcm"))
    ct = load_dicom_series(files)
    return files, ct, ct.with_array(np.asarray(load_nifti(root / "truth" / "labels.nii.gz").array,
                                               dtype=np.uint8))


def _lose_side(ct: Volume, labels: Volume) -> Volume:
    """The label map without one side of one muscle (by the midline of the x axis, patient left = +x)."""
    from seg.labels import by_name

    arr = labels.array.copy()
    x_mm = labels.affine[0, 0] * np.arange(arr.shape[0]) + labels.affine[0, 3]
    left = (x_mm > np.median(x_mm))[:, None, None]
    arr[(arr == by_name(LOST[0]).label) & left] = 0
    return ct.with_array(arr)


@pytest.mark.parametrize("order", ["in-order", "late-baseline"])
def test_node_follow_up_summary_shows_pre_and_post(tmp_path: Path, order: str) -> None:
    """The pipeline (``dicomnode.processing.pipeline.report``, as the worker runs it) finds the pair
    and builds the follow-up's summary with the baseline's CT and label map from the stored job
    folders: pre row above
    post row, each the key images of its own study (a muscle side present pre and lost post shows in
    its colour only in the pre row), the operated side (from the registry) marked on every axial panel.
    In the late-baseline flow the baseline's job builds that page again for the follow-up study."""
    import pydicom

    from dicomnode.clinical import registry
    from dicomnode.config import Settings
    from dicomnode.processing.pipeline import JobInput, report
    from reporting.sr import SR_SERIES_NUMBER
    from reporting.summary import SUMMARY_SERIES_NUMBER, _key_studies
    from seg.labels import by_name
    from seg.records import ChangeRecord, ClinicalTimePoint, VolumeRecord

    settings = Settings(storage_dir=tmp_path / "var", pairing={"retrieve_priors": False})
    csv = tmp_path / "registry.csv"
    csv.write_text("patient_id,height_m,sex,fracture_type,fractured_side,surgery_date\n"
                   f"{FOLLOW_PATIENT},1.70,F,ITF,right,20240115\n")
    registry.import_csv(settings, csv)
    b_files, b_ct, b_labels = _write_study(tmp_path / "base", "20240101", "base")
    f_files, f_ct, f_labels = _write_study(tmp_path / "follow", "20240601", "follow")
    f_labels = _lose_side(f_ct, f_labels)
    stored = {str(b_ct.header.series_instance_uid): b_files, str(f_ct.header.series_instance_uid): f_files}

    f_study = str(f_ct.header.study_instance_uid)

    summaries: dict[str, list[pydicom.Dataset]] = {}  # per study, the summaries sent into it
    measurement_srs: dict[str, pydicom.Dataset] = {}  # per study, its measurement SR

    def run(job_id: int, files: list[Path], ct: Volume, labels: Volume) -> list[pydicom.Dataset]:
        """One job through the pipeline; the follow-up study's summaries among the objects to send."""
        job = JobInput(job_id=job_id, series_instance_uid=str(ct.header.series_instance_uid), files=files,
                       work_dir=tmp_path / f"job{job_id}", series_files=lambda uid: stored[uid])
        job.work_dir.mkdir()
        sent = [pydicom.dcmread(p) for p in report(job, settings, ct, labels, MODEL).outputs]
        for ds in sent:
            if ds.SeriesNumber == SUMMARY_SERIES_NUMBER:
                summaries.setdefault(str(ds.StudyInstanceUID), []).append(ds)
            if ds.SeriesNumber == SR_SERIES_NUMBER:
                measurement_srs[str(ds.StudyInstanceUID)] = ds
        return [ds for ds in sent
                if ds.SeriesNumber == SUMMARY_SERIES_NUMBER and ds.StudyInstanceUID == f_study]

    studies = [(b_files, b_ct, b_labels), (f_files, f_ct, f_labels)]
    first, second = [run(i + 1, *s) for i, s in enumerate(studies if order == "in-order" else studies[::-1])]
    if order == "in-order":  # the baseline's own page, without a comparison: the registry's facts
        from reporting.summary import build_summary

        (b_page,) = summaries[str(b_ct.header.study_instance_uid)]
        b_vols = VolumeRecord.load(settings.storage_dir / "results" / str(b_ct.header.series_instance_uid)
                                   / "volumes.json")
        facts = ClinicalTimePoint(fractured_side="right", fracture_type="ITF", surgery_date="20240115",
                                  study_date="20240101")
        with_facts = build_summary(b_ct, b_vols, MODEL, facts=facts)
        assert b_page.SOPInstanceUID == with_facts.SOPInstanceUID
        assert b_page.SOPInstanceUID != build_summary(b_ct, b_vols, MODEL).SOPInstanceUID
        side_only = ClinicalTimePoint(fractured_side="right")
        assert b_page.SOPInstanceUID != build_summary(b_ct, b_vols, MODEL, facts=side_only).SOPInstanceUID
    # each study's measurement SR says where the registry's surgery date places it (one reading per job)
    time_points = {study: {str(i.TextValue) for i in _items(sr) if _code(i) == "C2348792"}
                   for study, sr in measurement_srs.items()}
    assert time_points == {str(b_ct.header.study_instance_uid): {"Pre-operative (surgery 2024-01-15)"},
                           f_study: {"Post-operative day 138 (surgery 2024-01-15)"}}
    (sc,) = second  # the follow-up's page with the comparison, once
    if order == "late-baseline":  # its page alone first; then a new instance of that series, pre and post
        (alone,) = first
        assert alone.SeriesInstanceUID == sc.SeriesInstanceUID
        assert alone.SOPInstanceUID != sc.SOPInstanceUID  # other content: never under the same UID
        assert alone.Rows < sc.Rows
        # which page is current: the later one is numbered after the first and says what it replaces
        assert (alone.InstanceNumber, sc.InstanceNumber) == (1, 2) and "ImageComments" not in alone
        assert sc.ImageComments.startswith("Replaces instance 1 of this series: now compared with the "
                                           "study of 2024-01-01")
    else:
        assert sc.InstanceNumber == 1 and "ImageComments" not in sc

    results = settings.storage_dir / "results" / str(f_ct.header.series_instance_uid)
    change = ChangeRecord.load(results / f"change-{b_ct.header.series_instance_uid}.json")
    assert change.fractured_side == "right"
    page = render_page(VolumeRecord.load(results / "volumes.json"), MODEL, f_ct.header, change)
    rows, cols = key_images_size(2)
    px = sc.pixel_array
    assert px.shape == (page.shape[0] + rows, cols, 3)
    keys = px[page.shape[0]:]

    # where a voxel of the lost side sits in the mid-thigh panel of each row (the same figure layout)
    pre, post = _key_studies(f_ct, f_labels, change, baseline=(b_ct, b_labels))
    assert [pre.caption, post.caption] == ["pre 2024-01-01", "post 2024-06-01"]  # as a reader reads dates
    fig = key_images_figure([pre, post], operated_side="right")
    k = key_slices(b_labels)[1][1]
    lost = (b_labels.array[:, :, k].T == by_name(LOST[0]).label) & (f_labels.array[:, :, k].T == 0)
    r, c, _ = _interior_voxel(np.where(lost, by_name(LOST[0]).label, 0))
    colour = np.array(structures()[by_name(LOST[0]).label].rgb, dtype=float)

    def pixel(ax_index: int) -> np.ndarray:
        x, y = fig.axes[ax_index].transData.transform((c, r))
        return keys[int(round(keys.shape[0] - y)), int(round(x))].astype(float)

    def tint(rgb: np.ndarray) -> float:  # how far a pixel leans to the muscle's colour from grey
        grey = rgb.mean()
        return float(np.dot(rgb - grey, colour - colour.mean()))

    assert (rasterise(fig) == keys).all()  # drawn (transData final) and the very page the node built
    mid_pre, mid_post = pixel(1), pixel(4 + 1)  # row 1: pre (axes 0-3), row 2: post (axes 4-7)
    want_pre = overlay_rgb(b_ct.array[:, :, k].T, b_labels.array[:, :, k].T)[r, c].astype(float)
    assert np.abs(mid_pre - want_pre).max() <= 3.0  # the baseline's CT and labels, in the SEG colour
    assert tint(mid_pre) > 0 and abs(tint(mid_post)) < tint(mid_pre) / 4  # lost: no colour post
    marks = [t for ax in fig.axes for t in ax.texts if "operated (right)" in t.get_text()]
    assert len(marks) == 2 * len(KEY_LEVELS)
    # the marks are drawn in red on the page: the top strip of each axial panel holds red text pixels
    for ax in (fig.axes[i] for i in (0, 1, 2, 4, 5, 6)):
        x0, y0, x1, y1 = ax.get_window_extent().extents
        strip = keys[int(keys.shape[0] - y1): int(keys.shape[0] - y1) + 20, int(x0): int(x1)].astype(int)
        assert ((strip[..., 0] > 200) & (strip[..., 1] < 120) & (strip[..., 2] < 120)).any()


def test_feet_first_key_images_are_those_of_head_first() -> None:
    """One patient scanned head-first and feet-first: the key images are the same picture (the
    patient's right on the image's left, R and L marked), not a mirror image that would put a left
    implant on the reader's right-hand side... of a right hip."""
    from reporting.summary import _key_studies

    pictures = []
    for position in ("HFS", "FFS"):
        ph = make_phantom(PhantomOptions(seed=3, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=(-60.0, 30.0),
                                         position=position, noise=False))
        assert (ph.ct.affine[0, 0] < 0) == (position == "FFS")  # stored the other way round
        pictures.append(rasterise(key_images_figure(_key_studies(ph.ct, ph.labels, None, None), "left")))
    assert np.array_equal(pictures[0], pictures[1])
    texts = [t.get_text() for ax in key_images_figure(
        _key_studies(ph.ct, ph.labels, None, None)).axes for t in ax.texts]
    assert texts.count("R") == texts.count("L") == len(KEY_LEVELS) + 1


def test_page_without_comparison_marks_the_fractured_side(study):
    """One study, the fractured side known (the registry's): every axial panel marks it as fractured,
    not operated (the study may precede surgery)."""
    from reporting.summary import _key_studies

    ct, labels = study
    fig = key_images_figure(_key_studies(ct, labels, None, None), "left", mark="fractured")
    marks = [t.get_text() for ax in fig.axes for t in ax.texts if "▼" in t.get_text()]
    assert marks == ["▼ fractured (left)"] * len(KEY_LEVELS)


def _items(ds):
    """Every SR content item, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _code(item) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)
