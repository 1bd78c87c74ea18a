"""Pictures of the metal-streak augmentation (seg.streaks) beside the phantom's own streaks.

One axial slice of a pre-operative training phantom on the model grid (windowed as the network sees
it), the same slice with streaks drawn as ``--streak-prob`` draws them, and a post-operative phantom
of the same plan with its implant's streaks: what the augmentation adds should look like the real
thing, anywhere.

    .venv/bin/python benchmarks/streak_examples.py --out docs/img/streak_augmentation.png
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from seg.streaks import add_to_windowed, draw_streaks, streak_field
from seg.train import TrainConfig, cache_case, phantom_plan, plan_phantom, preprocess_config


def model_grid_image(seed_index: int, seed_start: int, spacing: float) -> tuple[np.ndarray, bool]:
    """The windowed model-grid image of the plan's ``seed_index``-th phantom (3 in 4 post-operative)."""
    opts = phantom_plan(seed_index + 1, seed_start, 0.75)[seed_index]
    pre = preprocess_config(TrainConfig(spacing_mm=(spacing,) * 3))
    with tempfile.TemporaryDirectory() as d:
        p = cache_case(Path(d), "c", *_ct_labels(opts), pre, False)
        return np.load(p["image"]).astype(np.float32), opts.postop


def _ct_labels(opts):
    ph = plan_phantom(opts, None)
    return ph.ct, ph.labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/img/streak_augmentation.png"))
    ap.add_argument("--seed-start", type=int, default=7000)
    ap.add_argument("--rng", type=int, default=3, help="seed of the streaks drawn")
    a = ap.parse_args()
    spacing = 4.0
    pre = preprocess_config(TrainConfig(spacing_mm=(spacing,) * 3))
    pre_op, _ = model_grid_image(0, a.seed_start, spacing)  # index 0: pre-operative at 0.75
    post_op, postop = model_grid_image(1, a.seed_start, spacing)
    assert postop
    z = pre_op.shape[2] * 2 // 3  # the upper thigh, where the implant sits
    roi = (pre_op.shape[0], pre_op.shape[1], 1)
    rng = np.random.default_rng(a.rng)
    s = draw_streaks(rng, roi, (spacing,) * 3)
    # where an implant would be: the femur of the thigh on the image's right (bright voxels of the
    # outer part of that half), as the phantom's own streaks radiate from its implant
    from scipy import ndimage

    sl = pre_op[:, :, z]
    parts, n = ndimage.label(sl[: sl.shape[0] // 2] >= 0.99)  # the patient's left half
    centres = [c for c, size in zip(ndimage.center_of_mass(parts > 0, parts, range(1, n + 1)),
                                    ndimage.sum(parts > 0, parts, range(1, n + 1)), strict=True) if size >= 5]
    femur = min(centres, key=lambda c: c[0])  # the most lateral bone of that thigh
    s = replace(s, centre=(float(femur[0]), float(femur[1])), z_from=0, z_to=1)
    lit = add_to_windowed(pre_op[:, :, z:z + 1], streak_field(s, roi), pre)[:, :, 0]
    zp = post_op.shape[2] * 2 // 3

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.9), dpi=100)
    panels = [(pre_op[:, :, z], "pre-operative training crop"),
              (lit, f"the same with {len(s.angles)} streaks drawn"),
              (post_op[:, :, zp], "a post-operative phantom's own")]
    for ax, (img, title) in zip(axes, panels, strict=True):
        # RAS: x to the patient's right, y anterior; shown as radiologists view (right on the left)
        ax.imshow(img.T[::-1, ::-1], cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle("Metal-streak augmentation (--streak-prob), 4 mm model grid, window −57…164 HU, γ 2",
                 fontsize=10)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
