"""seg.streak_net: the learned streak correction touches only the body outside the metal in slices
with metal, by what the network predicts; scripts/train_streak_net.py trains and writes it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from seg.metal_proximity import METAL_HU
from seg.streak_net import (
    HU_SCALE,
    REACH_MM,
    StreakResidualNet,
    correct_streaks,
    load_streak_net,
    net_inputs,
    predict_streak,
    to_work,
)
from seg.volume import Volume

ROOT = Path(__file__).resolve().parents[1]


def _script():
    path = ROOT / "scripts" / "train_streak_net.py"
    spec = importlib.util.spec_from_file_location("train_streak_net", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _constant_net(hu: float) -> StreakResidualNet:
    """A network that predicts the same streak, ``hu``, everywhere."""
    net = StreakResidualNet()
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.fill_(hu / HU_SCALE)
    return net.eval()


def _ct(spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)) -> Volume:
    hu = np.full((40, 30, 5), 40, np.int16)  # muscle
    hu[:4] = -1000  # air
    hu[20:23, 14:17, 1:3] = 3071  # metal in slices 1 and 2
    return Volume(hu, np.diag([*spacing, 1.0]))


def test_the_predicted_streak_is_subtracted_from_the_body_outside_the_metal_only() -> None:
    ct = _ct()
    out = np.asarray(correct_streaks(ct, _constant_net(25.0)).array)
    hu = np.asarray(ct.array)
    body = (hu > -900) & (hu <= METAL_HU)
    with_metal = np.zeros(hu.shape, bool)
    with_metal[:, :, 1:3] = True
    assert np.array_equal(out[body & with_metal], hu[body & with_metal] - 25)
    assert np.array_equal(out[~(body & with_metal)], hu[~(body & with_metal)])  # metal, air, other slices
    assert out.dtype == hu.dtype


def test_only_the_metals_reach_is_corrected() -> None:
    """A voxel further than REACH_MM in-plane from the metal's box keeps its CT number."""
    hu = np.full((200, 30, 2), 40, np.int16)
    hu[20:23, 14:16, 0] = 3071
    out = np.asarray(correct_streaks(Volume(hu, np.diag([1.5, 1.5, 3.0, 1.0])), _constant_net(25.0)).array)
    reach = int(np.ceil(REACH_MM / 1.5))
    assert (out[:23 + reach, :, 0][hu[:23 + reach, :, 0] == 40] == 15).all()
    assert (out[23 + reach:, :, 0] == 40).all() and (out[:, :, 1] == 40).all()


def test_a_network_that_sees_no_streak_changes_nothing_and_no_metal_no_call() -> None:
    ct = _ct()
    assert np.array_equal(np.asarray(correct_streaks(ct, _constant_net(0.0)).array), np.asarray(ct.array))
    clean = ct.with_array(np.minimum(np.asarray(ct.array), 100))
    assert correct_streaks(clean, _constant_net(25.0)) is clean


def test_non_square_pixels_are_corrected_on_their_own_work_grid() -> None:
    ct = _ct((1.5, 1.0, 3.0))
    out = np.asarray(correct_streaks(ct, _constant_net(25.0)).array)
    hu = np.asarray(ct.array)
    body = (hu > -900) & (hu <= METAL_HU)
    assert np.array_equal(out[:, :, 1][body[:, :, 1]], hu[:, :, 1][body[:, :, 1]] - 25)
    assert to_work(np.zeros((40, 30, 1), np.float32), (1.5, 1.0)).shape == (1, 1, 24, 12)


def test_the_work_grid_is_the_area_average_at_2_5_mm() -> None:
    a = np.arange(2 * 10 * 10, dtype=np.float32).reshape(10, 10, 2, order="F")
    w = to_work(a, 1.25)  # 2 x 2 pixels per work pixel
    assert w.shape == (2, 1, 5, 5)
    assert float(w[0, 0, 0, 0]) == pytest.approx(float(a[:2, :2, 0].mean()))
    inp = net_inputs(torch.full((1, 1, 4, 4), 5000.0), torch.ones(1, 1, 4, 4))
    assert inp.shape == (1, 2, 4, 4) and float(inp[0, 0].max()) == pytest.approx(3.071)
    assert predict_streak(_constant_net(7.0), np.zeros((13, 11, 2), np.float32), 1.0).shape == (13, 11, 2)


def test_training_learns_a_constant_streak_and_the_file_loads(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _script()
    monkeypatch.setattr(mod, "CROP", 48)  # small crops: a few seconds on two cores
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(40, 20, (6, 1, 40, 40)).astype(np.float32))
    y, m = x - 30.0, torch.zeros_like(x)  # the streak: +30 HU everywhere
    np.savez(tmp_path / "1.npz", x=x.numpy(), y=y.numpy(), metal=m.numpy())
    data = mod.training_slices([tmp_path / "1.npz"])
    assert len(data) == 6 and data[0][0].shape == (2, 40, 40)
    xb, yb, mb = mod.batch_of(data, rng, 3)
    assert xb.shape == (3, 2, 48, 48) and float(mb[:, :, 40:].sum()) == 0.0  # the padding is not scored
    net, steps = mod.train(data, minutes=10.0, lr=3e-3, batch=4, log_every=10_000, max_steps=40)
    assert steps == 40
    save_file(net.state_dict(), str(tmp_path / "s.safetensors"))
    again = load_streak_net(str(tmp_path / "s.safetensors"))
    streak = predict_streak(again, x[0, 0].numpy()[:, :, None], 2.5)
    assert abs(float(np.median(streak)) - 30.0) < 15.0, float(np.median(streak))  # from 0 towards 30
