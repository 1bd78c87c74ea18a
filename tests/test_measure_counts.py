"""The fast counts of seg.measure equal the plain per-voxel computation they replace, on random maps:
side counts (whole-slab and per-voxel paths, any memory order, odd sizes), pairwise value counts, and
the CT's muscle-HU body count (few and many components) and metal."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from scipy import ndimage

from seg import labels as L
from seg.measure import (
    _ct_figures,
    _side_counts,
    _value_counts,
    _whole_slab_side_counts,
    _world,
    measure_volumes,
)
from seg.volume import Volume

N = L.NUM_CLASSES


def _reference_side_counts(arr: np.ndarray, affine: np.ndarray, mid: float) -> tuple[np.ndarray, np.ndarray]:
    """Every voxel's x (LPS) by the formula of seg.measure, and one bincount per side."""
    i, j, k = np.ix_(*(np.arange(n, dtype=np.float64) for n in arr.shape))
    a = affine[0]
    x = a[0] * i + a[1] * j + (a[2] * k + a[3])
    left = np.broadcast_to(x > mid, arr.shape)
    flat = arr.astype(np.intp)
    return (np.bincount(flat.ravel(), minlength=N)[:N],
            np.bincount(flat[left].ravel(), minlength=N)[:N])


def _affine(kind: str, shape: tuple[int, int, int]) -> np.ndarray:
    aff = np.diag([0.8, 0.9, 2.5, 1.0])
    aff[:3, 3] = (-0.8 * (shape[0] - 1) / 2, -40.0, -300.0)
    if kind == "flipped":  # i to the patient's right, k from head to feet
        aff[0, 0], aff[2, 2] = -0.8, -2.5
        aff[0, 3] = 0.8 * (shape[0] - 1) / 2
    elif kind == "oblique":  # rotated about z and tilted: x varies along every axis
        c, s = np.cos(0.3), np.sin(0.3)
        aff[:3, :3] = np.array([[c, -s, 0.1], [s, c, 0.0], [0.0, 0.05, 1.0]]) @ np.diag([0.8, 0.9, 2.5])
    return aff


def _random_labels(rng: np.random.Generator, shape: tuple[int, int, int], dtype: type) -> np.ndarray:
    arr = rng.integers(0, N, size=shape).astype(dtype)
    arr[rng.random(shape) < 0.6] = 0  # mostly background, as a thigh in its field of view
    return arr


@pytest.mark.parametrize("kind", ["axial", "flipped", "oblique"])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_side_counts_equal_the_per_voxel_counts(kind: str, order: str, dtype: type) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{kind} {order} {np.dtype(dtype).name}".encode()))
    shape = (37, 23, 11)  # odd sizes: an odd voxel count in every block of slabs
    arr = np.asarray(_random_labels(rng, shape, dtype), order=order)
    aff = _affine(kind, shape)
    for mid in (0.0, 3.3, aff[0, 0] * 18 + aff[0, 3], -1e6, 1e6):  # through a voxel column, none, all
        total, left = _side_counts(arr, aff, mid, N)
        want_total, want_left = _reference_side_counts(arr, aff, mid)
        assert total.tolist() == want_total.tolist()
        assert left.tolist() == want_left.tolist()


def test_whole_slab_counts_split_blocks_at_the_midline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of several slabs, never across the midline, give the counts of one slab at a time."""
    rng = np.random.default_rng(7)
    arr = _random_labels(rng, (40, 9, 7), np.uint8)
    aff = _affine("axial", arr.shape)
    mid = aff[0, 0] * 21.5 + aff[0, 3]
    monkeypatch.setattr("seg.measure._BLOCK_VOXELS", 9 * 7 * 6)  # six slabs per block
    total, left = _whole_slab_side_counts(arr, 0, aff[0], mid, N)
    want_total, want_left = _reference_side_counts(arr, aff, mid)
    assert total.tolist() == want_total.tolist() and left.tolist() == want_left.tolist()


@pytest.mark.parametrize("size", [0, 1, 2, 3, 1001, 65536 + 7])
def test_value_counts_equal_bincount(size: int) -> None:
    rng = np.random.default_rng(size)
    flat = rng.integers(0, N, size=size).astype(np.uint8)
    assert _value_counts(flat, N).tolist() == np.bincount(flat, minlength=N)[:N].tolist()
    strided = np.repeat(flat, 2)[::2]  # not contiguous: the plain bincount
    assert _value_counts(strided, N).tolist() == np.bincount(strided, minlength=N)[:N].tolist()
    shifted = np.concatenate([[0], flat]).astype(np.uint8)[1:]  # an odd byte offset: unaligned pairs
    assert _value_counts(shifted, N).tolist() == np.bincount(shifted, minlength=N)[:N].tolist()


def _reference_body(hu: np.ndarray) -> np.ndarray:
    """The largest component above -500 HU, counted by a bincount of the component labels."""
    m = hu > -500
    lab, n = ndimage.label(m)
    if n <= 1:
        return m
    return lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))


@pytest.mark.parametrize("blobs", [0, 1, 3, 20])
@pytest.mark.parametrize("order", ["C", "F"])
def test_ct_figures_equal_the_whole_volume_masks(blobs: int, order: str) -> None:
    rng = np.random.default_rng(blobs)
    shape = (41, 33, 17)
    hu = np.full(shape, -1000, np.int16)
    hu[5:36, 4:30, 2:15] = rng.integers(-200, 300, size=(31, 26, 13))  # the body: HU in and out of muscle
    for _ in range(blobs):  # couch, clothing: separate components, some with muscle HU
        i, j, k = rng.integers(0, 40), rng.integers(31, 33), rng.integers(0, 17)
        hu[i, j, k] = rng.integers(-100, 200)
    if blobs == 0:
        hu[:] = -1000  # no body at all
    hu[20:23, 10:12, 5:7] = 3000  # metal
    hu = np.asarray(hu, order=order)
    aff = _affine("axial", shape)
    figures = _ct_figures(Volume(hu, aff))
    body = _reference_body(hu)
    assert figures.hu_muscle_voxels == int(np.count_nonzero(body & (hu >= -29) & (hu <= 150)))
    assert figures.metal_world is not None
    assert np.array_equal(figures.metal_world, _world(aff, np.nonzero(hu > 2500)))
    assert _ct_figures(Volume(np.minimum(hu, 100), aff)).metal_world is None


def test_measure_volumes_on_a_random_map_with_its_ct() -> None:
    """The whole record, from the counts above: sides by the computed midline, QA from the CT."""
    rng = np.random.default_rng(11)
    shape = (60, 30, 12)
    arr = _random_labels(rng, shape, np.uint8)
    hu = rng.integers(-1000, 400, size=shape).astype(np.int16)
    aff = _affine("axial", shape)
    rec = measure_volumes(Volume(arr, aff), Volume(hu, aff.copy()))
    total, _ = _reference_side_counts(arr, aff, 0.0)
    assert [s.voxels for s in rec.structures] == total[1:].tolist()
    body = _reference_body(hu)
    vox = abs(np.linalg.det(aff[:3, :3])) / 1000.0
    assert rec.qa.hu_muscle_cm3 == round(float(np.count_nonzero(body & (hu >= -29) & (hu <= 150))) * vox, 4)
