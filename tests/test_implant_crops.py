"""Implant crops (--implant-crop-prob): the cache knows where each case's metal lies on the model grid,
and the planner centres the asked share of a case's crops there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from seg.metal_proximity import METAL_HU
from seg.preprocess import to_model_grid
from seg.preprocess_config import PreprocessConfig
from seg.train import CropPlanner, CropSampler, _is_cached, cache_case, metal_voxels
from seg.volume import Volume

PRE = PreprocessConfig()
ROI = (16, 16, 16)


def _ct(flip_k: bool) -> tuple[Volume, np.ndarray]:
    """A block of muscle in air with a metal rod; (CT, the rod's LPS bounding box, 2 x 3 mm).

    ``flip_k`` numbers the slices the other way (feet-first order): the rod must land on the same
    model-grid voxels either way."""
    sp = (1.0, 1.0, 2.0)
    hu = np.full((100, 90, 60), -1000.0, np.float32)
    hu[10:90, 10:80, 5:55] = 50.0
    rod = (slice(60, 66), slice(30, 36), slice(20, 40))
    hu[rod] = 3071.0
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = (-40.0, 25.0, 300.0)
    lo = affine[:3, 3] + np.array([r.start for r in rod]) * sp
    hi = affine[:3, 3] + (np.array([r.stop for r in rod]) - 1) * sp
    if flip_k:
        hu = hu[:, :, ::-1].copy()
        affine[:3, 3] += affine[:3, 2] * (hu.shape[2] - 1)
        affine[:3, 2] *= -1
    return Volume(hu, affine), np.stack([lo, hi])


@pytest.mark.parametrize("flip_k", [False, True])
def test_metal_voxels_lie_on_the_implant(flip_k: bool) -> None:
    """Every returned model-grid voxel's centre lies within half a model voxel of the rod, and the
    rod's length along the slice axis is covered."""
    ct, box = _ct(flip_k)
    mg = to_model_grid(ct, PRE)
    vox = metal_voxels(ct, mg.affine, mg.image.shape)
    assert vox.dtype == np.int16 and vox.shape[1] == 3 and len(vox) > 0
    ras = mg.affine @ np.c_[vox, np.ones(len(vox))].T
    lps = ras[:3].T * np.array([-1.0, -1.0, 1.0])
    half = np.array(PRE.spacing_mm) / 2
    assert np.all(lps >= box[0] - half - 1e-6) and np.all(lps <= box[1] + half + 1e-6)
    assert np.ptp(lps[:, 2]) >= (box[1, 2] - box[0, 2]) - 2 * half[2]
    bright = {tuple(v) for v in np.argwhere(mg.image > 0.9)}  # metal saturates the window
    assert bright and bright <= {tuple(v) for v in vox.tolist()}


def test_a_ct_without_metal_has_no_metal_voxels() -> None:
    ct, _ = _ct(False)
    ct = Volume(np.minimum(ct.array, METAL_HU - 1), ct.affine)
    mg = to_model_grid(ct, PRE)
    assert metal_voxels(ct, mg.affine, mg.image.shape).shape == (0, 3)


def test_the_cache_holds_the_metal_and_needs_it(tmp_path: Path) -> None:
    """A cache entry without its metal file (made before there was one) is made again."""
    ct, _ = _ct(False)
    labels = Volume((ct.array > 0).astype(np.uint8) * 3, ct.affine)
    paths = cache_case(tmp_path, "c", ct, labels, PRE, fractions=False)
    assert len(np.load(paths["metal"])) > 0
    assert _is_cached(paths, fractions=False)
    Path(paths["metal"]).unlink()
    assert not _is_cached(paths, fractions=False)


def _planner(prob: float) -> CropPlanner:
    p = CropPlanner(ROI, 0.85, True, np.random.default_rng(3), implant_prob=prob)
    p.add((60, 60, 60), {0: np.array([[10, 10, 10]])}, True, metal=np.array([[45, 45, 45]]))
    p.add((60, 60, 60), {0: np.array([[10, 10, 10]])}, False)  # no metal: never an implant crop
    return p


def _holds(plan, voxel: tuple[int, int, int]) -> bool:
    return bool(np.all((plan.start <= voxel) & (np.array(voxel) < plan.start + ROI)))


def test_the_asked_share_of_crops_centres_on_the_metal() -> None:
    """With 0.6, about 0.6 of a metal case's crops hold its metal (the foreground voxel lies too far
    for one crop to hold both); a case without metal gets none centred there."""
    p = _planner(0.6)
    plans = [p.draw() for _ in range(1000)]
    metal_case = [q for q in plans if q.case == 0]
    share = np.mean([_holds(q, (45, 45, 45)) for q in metal_case])
    assert 0.5 < share < 0.7, share
    # Only the few crops placed anywhere (1 - fg_prob) may hold that voxel otherwise.
    assert np.mean([_holds(q, (45, 45, 45)) for q in plans if q.case == 1]) < 0.05
    p0 = _planner(0.0)
    assert np.mean([_holds(q, (45, 45, 45)) for q in (p0.draw() for _ in range(500)) if q.case == 0]) < 0.05


def test_without_implant_crops_the_crops_are_drawn_as_before() -> None:
    """implant_prob 0 draws nothing more from the generator: a leg without implant crops crops what
    it always did, metal or not."""
    def plans(metal: np.ndarray | None, **kw) -> list:
        p = CropPlanner(ROI, 0.85, True, np.random.default_rng(11), **kw)
        p.add((40, 40, 40), {0: np.array([[20, 20, 20]])}, True, metal)
        drawn = (p.draw() for _ in range(20))
        return [(q.start.tolist(), q.flip, q.gain, q.offset, q.noise_sd) for q in drawn]

    assert plans(None) == plans(np.array([[5, 5, 5]]), implant_prob=0.0)
    with pytest.raises(ValueError, match="implant_prob"):
        CropPlanner(ROI, 1.0, False, np.random.default_rng(0), implant_prob=1.5)


def test_the_sampler_reads_the_metal_from_the_cache(tmp_path: Path) -> None:
    ct, _ = _ct(False)
    labels = Volume((ct.array > 0).astype(np.uint8) * 3, ct.affine)
    case = cache_case(tmp_path, "c", ct, labels, PRE, fractions=False) | {"postop": True}
    s = CropSampler([case], ROI, 0.85, False, np.random.default_rng(0), implant_prob=1.0)
    metal = np.load(case["metal"])
    assert np.array_equal(s.planner.metal[0], metal)
    assert all(any(_holds(q, tuple(v)) for v in metal) for q in (s.planner.draw() for _ in range(50)))


def test_the_command_refuses_a_share_outside_0_to_1() -> None:
    r = CliRunner().invoke(app, ["train", "--phantoms", "1", "--out", "x", "--implant-crop-prob", "1.5"])
    assert r.exit_code != 0 and "--implant-crop-prob must be between 0 and 1" in r.output
