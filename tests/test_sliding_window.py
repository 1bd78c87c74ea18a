"""The streamed sliding-window accumulator (seg/sliding.py) against MONAI's sliding_window_inference.

MONAI is the peer: the same windows, the same blend to float32 rounding, the same argmax except at
ties within that rounding, and a band that never holds more than one ROI of slices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from seg.sliding import stream_windows, window_grid

# (image shape, ROI, overlap, windows a batch, blend mode): odd sizes, axes shorter than the ROI,
# anisotropic ROIs, no / usual / large overlap, batches that straddle two rows of windows.
CASES = [
    ((40, 33, 50), (16, 16, 16), 0.25, 1, "gaussian"),
    ((10, 20, 7), (16, 16, 16), 0.25, 3, "gaussian"),
    ((37, 29, 61), (24, 16, 8), 0.5, 4, "constant"),
    ((30, 31, 90), (16, 12, 20), 0.7, 2, "gaussian"),
    ((30, 30, 30), (16, 16, 16), 0.0, 5, "gaussian"),
    ((17, 9, 45), (8, 12, 10), 0.4, 3, "gaussian"),
]


def _conv_net(channels: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(8, channels, 3, padding=1)
    ).eval()


def _image(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _monai(image: np.ndarray, roi, net, overlap: float, sw_batch: int, mode: str) -> torch.Tensor:
    with torch.inference_mode():
        x = torch.from_numpy(image)[None, None]
        return sliding_window_inference(x, roi, sw_batch, net, overlap=overlap, mode=mode)[0]


def _streamed(image: np.ndarray, roi, net, overlap: float, sw_batch: int, mode: str):
    out: torch.Tensor | None = None
    covered = np.zeros(image.shape[2], dtype=int)

    def sink(z0: int, z1: int, logits: torch.Tensor) -> None:
        nonlocal out
        if out is None:
            out = torch.zeros((logits.shape[0], *image.shape))
        out[..., z0:z1] = logits
        covered[z0:z1] += 1

    stats = stream_windows(image, roi, net, sink, overlap=overlap, mode=mode, sw_batch=sw_batch)
    assert (covered == 1).all(), "every slice handed to the sink exactly once"
    return out, stats


def assert_argmax_agrees(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Identical argmax except where MONAI's top two classes tie within the two blends' difference
    (the only place float rounding can flip it)."""
    delta = float((got - ref).abs().max())
    assert delta <= 1e-5 * max(1.0, float(ref.abs().max())), delta
    a, b = got.argmax(0), ref.argmax(0)
    differ = a != b
    if differ.any():
        gap = ref.max(0).values - ref.gather(0, a[None])[0]
        assert (gap[differ] <= 2 * delta).all(), "argmax differs away from a tie"


@pytest.mark.parametrize("shape,roi,overlap,sw_batch,mode", CASES)
def test_windows_are_monai_grid(shape, roi, overlap, sw_batch, mode) -> None:
    seen: list[tuple[int, ...]] = []

    def record(x, coords):
        seen.extend(tuple(s.start for s in c[2:]) for c in coords)
        return torch.zeros((x.shape[0], 2, *x.shape[2:]))

    with torch.inference_mode():
        x = torch.from_numpy(_image(shape))[None, None]
        sliding_window_inference(x, roi, sw_batch, record, overlap=overlap, mode=mode, with_coord=True)
    grid = window_grid(shape, roi, overlap)
    assert sorted(seen) == sorted(grid.windows()) and len(seen) == len(grid)
    calls: list[int] = []

    def count(x):
        calls.append(x.shape[0])
        return torch.zeros((x.shape[0], 2, *x.shape[2:]))

    stats = stream_windows(_image(shape), roi, count, lambda *a: None, overlap=overlap, mode=mode,
                           sw_batch=sw_batch)
    assert sum(calls) == stats.windows == len(seen), "each window computed once"
    assert max(calls) <= sw_batch and len(calls) == -(-len(seen) // sw_batch)


@pytest.mark.parametrize("shape,roi,overlap,sw_batch,mode", CASES)
def test_blend_agrees_with_monai(shape, roi, overlap, sw_batch, mode) -> None:
    net = _conv_net()
    img = _image(shape)
    ref = _monai(img, roi, net, overlap, sw_batch, mode)
    got, _ = _streamed(img, roi, net, overlap, sw_batch, mode)
    assert got.shape == ref.shape
    assert_argmax_agrees(got, ref)


def test_tiny_unetr_agrees_with_monai() -> None:
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    net = UNETR(in_channels=1, out_channels=4, img_size=(32, 32, 16), feature_size=8, hidden_size=32,
                mlp_dim=64, num_heads=2, norm_name="instance").eval()
    img = _image((50, 37, 70), seed=3)
    ref = _monai(img, (32, 32, 16), net, 0.25, 2, "gaussian")
    got, stats = _streamed(img, (32, 32, 16), net, 0.25, 2, "gaussian")
    assert stats.windows == len(window_grid(img.shape, (32, 32, 16), 0.25)) == 24
    assert_argmax_agrees(got, ref)


def test_band_stays_bounded_and_streams() -> None:
    """A long series: the band never holds more than one ROI of slices (less than ROI + stride), and
    finished slices leave long before the last window runs."""
    roi, overlap = (16, 16, 16), 0.25
    shape = (20, 20, 400)
    events: list[str] = []

    def predictor(x):
        events.append("window")
        return torch.ones((x.shape[0], 3, *x.shape[2:]))

    def sink(z0, z1, logits):
        events.append("release")
        assert z1 - z0 <= 8 and torch.allclose(logits, torch.ones(()))

    stats = stream_windows(_image(shape), roi, predictor, sink, overlap=overlap, sw_batch=3)
    stride = int(roi[2] * (1 - overlap))
    assert stats.depth == roi[2] and stats.max_open_slices <= roi[2] < roi[2] + stride
    assert [r[0] for r in stats.releases] == [0] + [r[1] for r in stats.releases[:-1]]
    assert stats.releases[-1][1] == shape[2]
    first = events.index("release")
    assert first < len(events) // 10, "slices are released while windows are still running"


def test_predict_probabilities_matches_monai_on_demo_model() -> None:
    """The demo package on a phantom's model grid: the uint8 probabilities differ from MONAI's by at
    most one rounding step, and their argmax only where they tie."""
    from seg.infer import PROB_SCALE, predict_probabilities
    from seg.model import load_model
    from seg.phantom import PhantomOptions, make_phantom
    from seg.preprocess import to_model_grid

    pkg = load_model(device="cpu")
    ph = make_phantom(PhantomOptions(seed=777_002, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-200.0, 100.0)))
    img = to_model_grid(ph.ct, pkg.preprocess).image
    assert len(window_grid(img.shape, pkg.roi_size, 0.25)) > 4 and img.shape[2] > pkg.roi_size[2]
    got = predict_probabilities(pkg, img, precision="fp32", sw_batch=2, mirror=False)  # MONAI runs no mirror
    ref = _monai(np.ascontiguousarray(img, dtype=np.float32), pkg.roi_size, pkg.network, 0.25, 2, "gaussian")
    ref = torch.softmax(ref, 0).mul_(PROB_SCALE).add_(0.5).to(torch.uint8).numpy()
    assert got.shape == ref.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    a, b = got.argmax(0), ref.argmax(0)
    differ = a != b
    ga, gb = (np.take_along_axis(got, k[None], 0)[0][differ] for k in (a, b))
    ra, rb = (np.take_along_axis(ref, k[None], 0)[0][differ] for k in (a, b))
    assert ((ga == gb) | (ra == rb)).all(), "argmax differs where neither has a tie"
    assert differ.mean() < 1e-3
