"""Metal-streak augmentation (seg.streaks): the field, its addition in HU, and the crops that get it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from seg.preprocess_config import PreprocessConfig
from seg.streaks import FAT_HU, Streaks, add_to_windowed, draw_streaks, streak_field
from seg.train import CropPlanner, CropSampler

PRE = PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0))
ROI = (32, 32, 32)


def _windowed(hu: float) -> float:
    lo, hi = PRE.hu_window
    return float(np.clip((hu - lo) / (hi - lo), 0, 1) ** PRE.gamma)


def test_a_streak_is_a_line_through_its_centre_that_fades() -> None:
    """One streak along axis 0 through (16, 10): strong on the line, nothing a few widths off it,
    weaker far from the centre, absent outside its slices."""
    s = Streaks(centre=(16.0, 10.0), angles=(0.0,), amplitudes_hu=(400.0,), width_sd_vox=1.0,
                fade_vox=20.0, z_from=8, z_to=24)
    f = streak_field(s, ROI)
    assert f.shape == ROI and f.dtype == np.float32
    assert f[16, 10, 10] == pytest.approx(400.0, rel=1e-4)
    assert abs(f[16, 16, 10]) < 1e-6  # six widths across the line
    assert f[30, 10, 10] == pytest.approx(400.0 * math.exp(-14 / 20), rel=1e-4)
    assert not f[:, :, :8].any() and not f[:, :, 24:].any()


def test_drawn_streaks_stay_within_the_phantoms_range() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = draw_streaks(rng, ROI, (4.0, 4.0, 4.0))
        assert 1 <= len(s.angles) == len(s.amplitudes_hu) <= 7
        assert all(80 <= abs(a) <= 700 for a in s.amplitudes_hu)
        assert 0 <= s.z_from < s.z_to <= ROI[2] and s.z_to - s.z_from >= ROI[2] // 2


def test_streaks_are_added_in_hu_to_the_windowed_image() -> None:
    """Fat (below the window) lit by +135 HU reads as muscle at +35 HU; muscle darkened by −300 HU falls
    below the window; no streak changes nothing; numpy and torch agree."""
    x = np.array([0.0, _windowed(40.0), _windowed(100.0)], np.float32)
    same = add_to_windowed(x, np.zeros(3, np.float32), PRE)
    np.testing.assert_allclose(same, x, atol=1e-6)
    lit = add_to_windowed(x, np.full(3, 135.0, np.float32), PRE)
    assert lit[0] == pytest.approx(_windowed(FAT_HU + 135.0), abs=1e-6)
    assert lit[1] == pytest.approx(_windowed(175.0), abs=1e-6) and lit[1] == 1.0
    dark = add_to_windowed(x, np.full(3, -300.0, np.float32), PRE)
    assert dark.tolist() == [0.0, 0.0, 0.0]
    t = add_to_windowed(torch.from_numpy(x), torch.full((3,), 135.0), PRE)
    np.testing.assert_allclose(t.numpy(), lit, atol=1e-6)


def _case(tmp_path: Path) -> dict:
    img = np.zeros((40, 40, 40), np.float16)  # all fat: any streak of positive amplitude shows
    lab = np.zeros((40, 40, 40), np.uint8)
    lab[10:30, 10:30, 10:30] = 3
    np.save(tmp_path / "a_image.npy", img)
    np.save(tmp_path / "a_labels.npy", lab)
    return {"image": str(tmp_path / "a_image.npy"), "labels": str(tmp_path / "a_labels.npy")}


def test_crops_get_streaks_as_often_as_asked(tmp_path: Path) -> None:
    """--streak-prob 0.4 draws streaks for about four crops in ten; the sampler lights the fat of the
    crops that get them (the jitter alone never reaches 0.25) and never changes the labels."""
    planner = CropPlanner(ROI, 1.0, False, np.random.default_rng(5), streak_prob=0.4)
    planner.add((40, 40, 40), {0: np.array([[20, 20, 20]])}, False)
    assert 0.33 < np.mean([planner.draw().streaks is not None for _ in range(600)]) < 0.47

    def lit_share(prob: float) -> float:
        s = CropSampler([_case(tmp_path)], ROI, 1.0, False, np.random.default_rng(5), streak_prob=prob,
                        pre=PRE)
        lit = 0
        for _ in range(100):
            x, y = s.sample()
            lit += int((x > 0.25).sum() > 20)
            assert set(np.unique(y)) <= {0, 3}
        return lit / 100

    assert lit_share(0.0) == 0.0
    assert lit_share(1.0) > 0.5


def test_without_streaks_the_crops_are_drawn_as_before() -> None:
    """streak_prob 0 draws nothing more from the generator: a leg without streaks crops what it
    always did."""
    def plans(**kw) -> list:
        p = CropPlanner(ROI, 0.85, True, np.random.default_rng(11), **kw)
        p.add((40, 40, 40), {0: np.array([[20, 20, 20]])}, False)
        return [p.draw() for _ in range(20)]

    old, new = plans(), plans(streak_prob=0.0)
    assert [(q.start.tolist(), q.flip, q.gain, q.offset, q.noise_sd) for q in old] == [
        (q.start.tolist(), q.flip, q.gain, q.offset, q.noise_sd) for q in new]
    assert all(q.streaks is None for q in new)
    assert all(q.streaks is not None for q in plans(streak_prob=1.0))


def test_streaks_need_the_window_and_a_probability(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preprocessing"):
        CropSampler([_case(tmp_path)], ROI, 1.0, False, np.random.default_rng(0), streak_prob=0.5)
    with pytest.raises(ValueError, match="streak_prob"):
        CropPlanner(ROI, 1.0, False, np.random.default_rng(0), streak_prob=1.5)
