"""HU refinement of label edges (seg/hu_refine.py): edges follow the CT number, interiors do not,
slabs give the whole-volume result, and a package asks for it in words the node checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from seg import labels as L
from seg.hu_refine import HURefinement, _box_any, _member, refine_labels
from seg.package import ModelPackageError, read_meta

FAT, MUSCLE_HU, CORTEX, MARROW = -100, 50, 1300, 20
SART = L.by_name("sartorius").label
GRAC = L.by_name("gracilis").label
FEMUR = L.by_name("femur").label
RULE = HURefinement()
ISO = (1.5, 1.5, 1.5)


def _fat(shape=(40, 40, 20)) -> np.ndarray:
    return np.full(shape, FAT, np.int16)


def test_muscle_edges_follow_the_ct_number_both_ways() -> None:
    """A prediction one voxel too wide on one side and one too narrow on the other comes back
    exactly to the muscle the CT shows."""
    hu = _fat()
    hu[10:30, 10:30, :] = MUSCLE_HU
    truth = np.where(hu == MUSCLE_HU, SART, 0).astype(np.uint8)
    pred = np.zeros_like(truth)
    pred[9:29, 10:30, :] = SART  # one voxel over the fat at x=9, one voxel short at x=29
    out = refine_labels(hu, pred, ISO, RULE)
    assert (pred != truth).sum() == 2 * 20 * 20
    np.testing.assert_array_equal(out, truth)


def test_fat_deep_inside_a_muscle_stays_muscle() -> None:
    """Fat infiltration beyond the band is the network's call: a fatty core of a big muscle is kept,
    while the same HU at the edge is cut."""
    hu = _fat()
    hu[5:35, 5:35, :] = MUSCLE_HU
    hu[18:22, 18:22, :] = -60  # 13 voxels (19.5 mm) from the edge: far beyond 3 mm
    pred = np.zeros(hu.shape, np.uint8)
    pred[4:35, 5:35, :] = SART  # x=4 over the fat at the edge  # over the fat at the edge
    out = refine_labels(hu, pred, ISO, RULE)
    assert (out[18:22, 18:22, :] == SART).all()
    assert (out[4] == 0).all()


def test_background_goes_to_the_nearest_muscle() -> None:
    """Muscle-dense voxels the network left as background between two muscles join the nearer one."""
    hu = _fat()
    hu[10:30, 10:30, :] = MUSCLE_HU
    pred = np.zeros(hu.shape, np.uint8)
    pred[10:19, 10:30, :] = SART
    pred[21:30, 10:30, :] = GRAC  # x=19 and x=20 left out
    out = refine_labels(hu, pred, ISO, RULE)
    assert (out[19, 10:30] == SART).all() and (out[20, 10:30] == GRAC).all()
    assert (out[19, :10] == 0).all()  # the fat beside stays background


def test_bone_edges_follow_the_cortex_and_marrow_stays_bone() -> None:
    hu = _fat()
    hu[5:35, 5:35, :] = MUSCLE_HU
    hu[14:26, 14:26, :] = CORTEX
    hu[16:24, 16:24, :] = MARROW  # marrow inside a 2-voxel (3 mm) cortex: below 200 HU, still bone
    truth = np.where((hu == CORTEX) | (hu == MARROW), FEMUR, SART).astype(np.uint8)
    truth[hu == FAT] = 0
    pred = truth.copy()
    pred[13, 14:26, :] = FEMUR  # one voxel over the muscle
    pred[25, 14:26, :] = SART  # the cortex on the other side labelled muscle
    out = refine_labels(hu, pred, ISO, RULE)
    np.testing.assert_array_equal(out, truth)


def test_claims_need_a_low_background_probability_when_the_rule_asks() -> None:
    """A vessel-like blob of muscle HU beside a muscle is claimed by the CT number alone; with
    ``claim_max_background`` only where the network's background probability is below it. Cutting
    fat off the muscle does not depend on it, and slabs give the whole-volume answer."""
    hu = _fat()
    hu[10:30, 10:30, :] = MUSCLE_HU
    hu[30:32, 14:18, :] = 42  # a vessel touching the muscle's edge at x=30
    pred = np.zeros(hu.shape, np.uint8)
    pred[10:30, 10:31, :] = SART  # one column over the fat at y=30
    bg = np.full(hu.shape, 10, np.uint8)
    bg[30:32, 14:18, :10] = 250  # the network is sure these are background (first 10 slices)
    gated = HURefinement(claim_max_background=0.8)
    assert (refine_labels(hu, pred, ISO, RULE)[30:32, 14:18] == SART).all()
    out = refine_labels(hu, pred, ISO, gated, background=bg)
    assert (out[30:32, 14:18, :10] == 0).all() and (out[30:32, 14:18, 10:] == SART).all()
    assert (out[10:30, 30] == 0).all()
    np.testing.assert_array_equal(refine_labels(hu, pred, ISO, gated, slab=3, background=bg), out)
    with pytest.raises(ValueError, match="background probability"):
        refine_labels(hu, pred, ISO, gated)


def test_in_slices_with_metal_only_a_doubtful_muscle_voxel_is_cut_as_fat() -> None:
    """A streak darkens a muscle's edge below the muscle window in every slice. Without the gate
    the edge is cut everywhere; with ``metal_slice_cut_min_background`` it is kept in the slices
    holding metal where the network is sure of the muscle (background probability below the
    gate), and still cut where the network doubts it or the slice holds no metal."""
    hu = _fat()
    hu[10:30, 10:30, :] = MUSCLE_HU
    hu[10:30, 28:30, :] = -60  # streak-dark muscle along the edge at y=28..29
    hu[2, 2, 5:10] = 3071  # metal in slices 5..9
    pred = np.where(hu[..., :1] >= -60, SART, 0).repeat(hu.shape[2], axis=2).astype(np.uint8)
    pred[2, 2, :] = 0
    bg = np.full(hu.shape, 10, np.uint8)  # the network is sure of the muscle...
    bg[10:20, 28:30, :] = 200  # ...except on half of the dark edge
    gated = HURefinement(metal_slice_cut_min_background=0.25)
    assert gated.reads_background and not RULE.reads_background
    cut = refine_labels(hu, pred, ISO, RULE)
    assert (cut[10:30, 28:30] == 0).all()
    out = refine_labels(hu, pred, ISO, gated, background=bg)
    assert (out[20:30, 28:30, 5:10] == SART).all()  # metal slices, network sure: kept
    assert (out[10:20, 28:30, 5:10] == 0).all()  # metal slices, network doubtful: cut
    assert (out[10:30, 28:30, :5] == 0).all() and (out[10:30, 28:30, 10:] == 0).all()  # no metal: cut
    np.testing.assert_array_equal(np.delete(out, [28, 29], axis=1), np.delete(cut, [28, 29], axis=1))
    np.testing.assert_array_equal(refine_labels(hu, pred, ISO, gated, slab=4, background=bg), out)
    with pytest.raises(ValueError, match="metal_slice_cut_min_background needs the background"):
        refine_labels(hu, pred, ISO, gated)


def test_slabs_give_the_whole_volume_result() -> None:
    """The halo is wide enough: any slab size gives the whole-volume answer (anisotropic spacing)."""
    rng = np.random.default_rng(7)
    hu = rng.normal(0, 80, (32, 30, 41)).astype(np.int16)
    hu[rng.random(hu.shape) < 0.05] = CORTEX
    pred = np.zeros(hu.shape, np.uint8)
    pred[4:20, 3:25, 5:30] = SART
    pred[20:28, 3:25, 10:38] = GRAC
    pred[12:22, 12:18, 0:41] = FEMUR
    for spacing in ((1.0, 1.0, 1.0), (0.8, 0.8, 2.5)):
        whole = refine_labels(hu, pred, spacing, RULE, slab=10_000)
        assert (whole != pred).any()
        for slab in (1, 4, 9):
            np.testing.assert_array_equal(refine_labels(hu, pred, spacing, RULE, slab=slab), whole)


def test_rule_refuses_typos_and_bad_ranges() -> None:
    with pytest.raises(ValidationError):
        HURefinement.model_validate({"muscle_hu": [-29, 150], "bone_min": 200})
    with pytest.raises(ValidationError):
        HURefinement(muscle_hu=(150.0, -29.0))
    with pytest.raises(ValidationError):
        HURefinement(muscle_band_mm=0)
    assert HURefinement.model_validate(json.loads(RULE.model_dump_json())) == RULE


def test_package_inference_requests_are_checked(tmp_path) -> None:
    """A package's model.json is refused, with its path and the key, for an unknown request, a
    malformed refinement rule or a mirror request that is not a yes or no."""
    base = {"name": "x", "version": "1", "architecture": {}, "roi_size": [], "preprocessing": {},
            "classes": [], "weights": {}}
    for inference, words in (({"mirror": True}, "unknown 'inference' keys ['mirror']"),
                             ({"hu_refinement": {"muscle_hu": [0, -1]}}, "hu_refinement' is invalid"),
                             ({"mirror_x": "sideways"}, "mirror_x' is invalid")):
        d = tmp_path / str(len(words))
        d.mkdir()
        (d / "model.json").write_text(json.dumps(base | {"inference": inference}))
        with pytest.raises(ModelPackageError, match="model.json") as err:
            read_meta(d)
        assert words in str(err.value)


@pytest.mark.parametrize("half", [(0, 0, 0), (1, 1, 0), (2, 2, 2), (0, 3, 5), (6, 6, 2), (9, 1, 1)])
def test_band_filter_equals_scipys_maximum_filter(half) -> None:
    """The OR-of-shifts band (faster) is scipy's maximum filter with the box clipped at the border,
    also where the band is wider than the array."""
    rng = np.random.default_rng(sum(half))
    for density in (0.02, 0.3, 0.9):
        mask = rng.random((11, 8, 7)) < density
        want = ndimage.maximum_filter(mask, size=tuple(2 * h + 1 for h in half), mode="nearest")
        assert np.array_equal(_box_any(mask, half), want)


def test_label_ranges_equal_the_class_table() -> None:
    from seg.hu_refine import _BONE, _MUSCLE

    every = np.arange(256, dtype=np.uint8)
    none = [False] * (256 - L.NUM_CLASSES)
    muscle = np.array([s.is_muscle for s in L.structures()] + none)
    bone = np.array([s.name in ("femur", "iliac_bone") for s in L.structures()] + none)

    assert np.array_equal(_member(every, _MUSCLE), muscle)
    assert np.array_equal(_member(every, _BONE), bone)
