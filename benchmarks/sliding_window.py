"""Every window computed once (issue #14): window counts, whole-thigh time and peak memory.

With the paper-size UNETR (random weights: timing and memory only), windows counted at the network:

- ``--whole``: the 1.5 mm whole-thigh phantom (seed 424242) through :func:`seg.infer.segment`; prints
  the windows run, what the replaced slab-wise stitching ran on the same model grid, the seconds,
  seconds per window and peak RSS. Needs the whole machine (run it through the campaign's pause).
- ``--slices N``: a synthetic N-slice model-grid series (the whole thigh's 293 × 181 plane) through
  :func:`seg.infer.predict_probabilities`; peak RSS with the big buffers named (issue target: ≤ 4 GB
  for 1,000 slices). Memory only: it may run niced beside other work.

    .venv/bin/python benchmarks/sliding_window.py --whole --threads 2
    OMP_NUM_THREADS=2 nice -n 19 /usr/bin/time -v .venv/bin/python benchmarks/sliding_window.py --slices 1000
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch


class WindowCounter(torch.nn.Module):
    """The network, counting the windows it is given."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.windows = net, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += int(x.shape[0])
        return self.net(x)


def slab_windows(shape: tuple[int, int, int], roi: tuple[int, int, int], channels: int,
                 overlap: float = 0.25, slab_mb: float = 768.0) -> int:
    """Windows the replaced slab-wise stitching ran (seg/infer.py before #14): MONAI's grid on each
    slab of ``core`` slices plus half-ROI margins, ``core`` from a 768 MB float-logit budget."""
    from seg.sliding import window_grid

    nx, ny, nz = shape
    margin = roi[2] // 2
    per_slice = channels * max(nx, roi[0]) * max(ny, roi[1]) * 4
    core = max(roi[2], int(slab_mb * 2**20 // per_slice) - 2 * margin)
    n = 0
    for z0 in range(0, nz, core):
        a, b = max(0, z0 - margin), min(nz, z0 + core + margin)
        n += len(window_grid((nx, ny, b - a), roi, overlap))
    return n


def paper_package(spacing_mm: float = 1.5):
    """The paper-size UNETR (random weights, seed 0) as an in-memory CPU package, window-counted."""
    from seg.model import build_network, in_memory_package
    from seg.package import Architecture
    from seg.preprocess_config import PreprocessConfig
    from seg.recipe import PAPER_UNETR

    torch.manual_seed(0)
    net = WindowCounter(build_network(Architecture(args=dict(PAPER_UNETR))).eval())
    return in_memory_package(net, dict(PAPER_UNETR), PreprocessConfig(spacing_mm=(spacing_mm,) * 3),
                             torch.device("cpu"))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def whole(seed: int) -> dict:
    from seg.infer import segment
    from seg.phantom import PhantomOptions, make_phantom
    from seg.preprocess import to_model_grid
    from seg.sliding import window_grid

    pkg = paper_package()
    ct = make_phantom(PhantomOptions(seed=seed, spacing_mm=(1.5, 1.5, 1.5))).ct
    grid = to_model_grid(ct, pkg.preprocess).image.shape
    rss0 = _rss_mb()
    t = time.perf_counter()
    segment(ct, pkg, precision="fp32")
    dt = time.perf_counter() - t
    n = pkg.network.windows
    return {
        "ct_shape": list(ct.shape),
        "model_grid": list(grid),
        "windows_run": n,
        "windows_grid": len(window_grid(grid, pkg.roi_size, 0.25)),
        "windows_slab_before": slab_windows(grid, pkg.roi_size, 30),
        "seconds": round(dt, 1),
        "seconds_per_window": round(dt / max(n, 1), 2),
        "peak_rss_mb": round(_rss_mb(), 1),
        "rss_before_segment_mb": round(rss0, 1),
    }


def series(slices: int, plane: tuple[int, int]) -> dict:
    from seg.infer import predict_probabilities
    from seg.sliding import window_grid

    pkg = paper_package()
    shape = (*plane, slices)
    img = np.random.default_rng(0).random(shape, dtype=np.float32)  # values change neither memory nor windows
    roi, c = pkg.roi_size, int(pkg.meta.architecture.args["out_channels"])
    rss0 = _rss_mb()
    t = time.perf_counter()
    probs = predict_probabilities(pkg, img, precision="fp32")
    dt = time.perf_counter() - t
    mb = 2**20
    return {
        "model_grid": list(shape),
        "windows_run": pkg.network.windows,
        "windows_grid": len(window_grid(shape, roi, 0.25)),
        "windows_slab_before": slab_windows(shape, roi, c),
        "seconds": round(dt, 1),
        "peak_rss_mb": round(_rss_mb(), 1),
        "rss_before_inference_mb": round(rss0, 1),
        "uint8_probabilities_mb": round(probs.nbytes / mb, 1),
        "float_band_mb": round(c * shape[0] * shape[1] * roi[2] * 4 / mb, 1),
        "image_mb": round(img.nbytes / mb, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--whole", action="store_true", help="1.5 mm whole-thigh phantom through segment()")
    mode.add_argument("--slices", type=int, help="synthetic model-grid series of this many slices")
    ap.add_argument("--plane", type=int, nargs=2, default=(293, 181), help="--slices: model-grid X Y")
    ap.add_argument("--seed", type=int, default=424242, help="--whole: phantom seed")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rec = whole(args.seed) if args.whole else series(args.slices, tuple(args.plane))
    print(json.dumps({"threads": args.threads, **rec}, indent=1), flush=True)


if __name__ == "__main__":
    main()
