"""The implant's streaks made by projection (seg.phantom.metal_ct): deterministic per seed, strong
beside the metal and fading, along the rays the metal starves, on any grid's shape."""

from __future__ import annotations

import numpy as np

from seg.phantom import metal_ct

BAR_MM = (40.0, 8.0)  # a stem's section cut lengthwise: the rays along it cross 40 mm of metal


def _slice(spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A 160 mm-radius body of soft tissue with a metal bar along x at its centre; (hu, metal, dx, dy)
    where dx, dy are each pixel's offset (mm) from the bar's centre."""
    n = int(round(360 / spacing))
    dx, dy = (np.mgrid[:n, :n] + 0.5) * spacing - 180.0
    hu = np.where(np.hypot(dx, dy) < 160, 40.0, -1000.0).astype(np.float32)
    metal = (np.abs(dx) < BAR_MM[0] / 2) & (np.abs(dy) < BAR_MM[1] / 2)
    hu[metal] = 3071.0
    return hu, metal, dx, dy


def test_deterministic_per_seed() -> None:
    hu, metal, _, _ = _slice(3.0)
    a = metal_ct.streak_error(hu, metal, 3.0, seed=3)
    assert a.dtype == np.float32 and a.shape == hu.shape
    assert np.array_equal(a, metal_ct.streak_error(hu, metal, 3.0, seed=3))
    assert not np.array_equal(a, metal_ct.streak_error(hu, metal, 3.0, seed=4))


def test_strong_beside_the_metal_and_fading() -> None:
    hu, metal, dx, dy = _slice(3.0)
    err = np.abs(metal_ct.streak_error(hu, metal, 3.0, seed=1))
    r = np.hypot(np.maximum(np.abs(dx) - BAR_MM[0] / 2, 0), np.maximum(np.abs(dy) - BAR_MM[1] / 2, 0))
    near, far = err[(r > 10) & (r < 30)].mean(), err[(r > 100) & (r < 140)].mean()
    assert near > 100  # HU
    assert far < 0.4 * near


def test_a_dark_streak_runs_through_the_metal_along_its_length() -> None:
    """The rays along the bar cross the most metal, are starved and hardened most, and read too
    little attenuation: a dark streak continues the bar on both sides, none runs across it."""
    hu, metal, dx, dy = _slice(3.0)
    err = metal_ct.streak_error(hu, metal, 3.0, seed=2)
    ends = (np.abs(dx) > 40) & (np.abs(dx) < 100) & (np.abs(dy) < 3)
    sides = (np.abs(dy) > 40) & (np.abs(dy) < 100) & (np.abs(dx) < 3)
    assert err[ends].mean() < -200
    assert abs(err[sides].mean()) < 0.2 * abs(err[ends].mean())


def test_fine_grids_are_simulated_coarse_and_resampled_to_their_shape() -> None:
    """A 1 mm slice is simulated on the 2 mm work grid: its error has the slice's shape and the
    strength the coarse grid gives."""
    fine, coarse = _slice(1.0), _slice(metal_ct.SCANNER.work_mm)
    a = metal_ct.streak_error(fine[0], fine[1], 1.0, seed=5)
    b = metal_ct.streak_error(coarse[0], coarse[1], metal_ct.SCANNER.work_mm, seed=5)
    assert a.shape == fine[0].shape and np.isfinite(a).all()
    ring_a = (np.hypot(fine[2], fine[3]) > 40) & (np.hypot(fine[2], fine[3]) < 80)
    ring_b = (np.hypot(coarse[2], coarse[3]) > 40) & (np.hypot(coarse[2], coarse[3]) < 80)
    assert 0.8 < np.abs(a[ring_a]).mean() / np.abs(b[ring_b]).mean() < 1.25
