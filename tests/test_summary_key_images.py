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
from seg.volume import Volume

MODEL = {"name": "unetr-test", "version": "9.9", "demo": True}


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
    page = render_page(vols, MODEL, ct.meta)
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
