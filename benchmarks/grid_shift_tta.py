"""Would a second pass on a model grid moved by half a voxel help the shipped model?

Test-time ensembling over grid positions: the CT is resampled a second time onto the model grid
shifted by half a model voxel along every axis, the network runs there too, and the two passes'
class probabilities are averaged on the CT grid before the argmax and the HU refinement. Variants
(each a set of passes whose probabilities are averaged):

    A   the shipped inference: the grid as preprocessing makes it, mirrored windows
    B   the shifted grid alone, mirrored
    AB  both, mirrored (twice the network's work)
    C   the grid, unmirrored
    CD  the grid unmirrored and the shifted grid's left-right mirror: the shipped network cost

Measured on post-operative phantoms and their pre-operative twins (seeds from ``--seed-start``, the
post-operative ones of the held-out plan): mean muscle Dice, median absolute per-muscle volume error
and the atrophied muscles' pre->post loss error, with and without the HU refinement. One JSON line
per CT in ``--out`` (resumable); ``--report`` prints the table again.

    .venv/bin/python benchmarks/grid_shift_tta.py --pairs 12 --seed-start 6000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from seg.volume import LPS_TO_RAS

if TYPE_CHECKING:
    from seg.phantom import PhantomOptions

VARIANTS = {"A": ("A",), "B": ("B",), "AB": ("A", "B"), "C": ("C",), "CD": ("C", "D")}


def shifted_image(ct, model_affine: np.ndarray, shape: tuple[int, ...], cfg, shift: np.ndarray):
    """The model-grid image on ``model_affine`` moved by ``shift`` model voxels, windowed as
    preprocessing windows it (linear interpolation, border values outside the CT)."""
    from monai.transforms import AdjustContrast, ScaleIntensityRange
    from scipy import ndimage

    affine = model_affine.copy()
    affine[:3, 3] += affine[:3, :3] @ shift
    m = np.linalg.inv(LPS_TO_RAS @ ct.affine) @ affine
    index = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = m[:3, :3].astype(np.float32) @ index + m[:3, 3:4].astype(np.float32)
    hu = ndimage.map_coordinates(np.asarray(ct.array, np.float32), coords, order=1, mode="nearest")
    lo, hi = cfg.hu_window
    x = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(
        torch.from_numpy(hu.reshape(shape)))
    return np.asarray(AdjustContrast(gamma=cfg.gamma)(x), dtype=np.float32), affine


def _taps(coord: np.ndarray, size: int):
    inside = (coord >= -1e-3) & (coord <= size - 1 + 1e-3)
    c = np.clip(coord, 0.0, size - 1)
    lo = np.floor(c).astype(np.int64)
    return (torch.from_numpy(lo), torch.from_numpy(np.minimum(lo + 1, size - 1)),
            torch.from_numpy((c - lo).astype(np.float32)), inside)


def averaged_labels(passes: list[tuple[np.ndarray, np.ndarray]], ct, slab: int = 8):
    """Labels and background probability (×255) of the mean CT-grid probability of several
    (uint8 model-grid probabilities, model affine) passes; trilinear, 0 outside any grid."""
    from seg.infer import _axis_map

    parts = []
    for probs, affine in passes:
        m = np.linalg.inv(affine) @ (LPS_TO_RAS @ ct.affine)
        axes = _axis_map(m)
        if axes is None:
            raise ValueError("only grids parallel to the CT's axes")
        taps = [_taps(m[a, p] * np.arange(ct.shape[p], dtype=np.float64) + m[a, 3], probs.shape[1 + a])
                for p, a in enumerate(axes)]
        inside = taps[0][3][:, None, None] & taps[1][3][None, :, None] & taps[2][3][None, None, :]
        order = (0, 1 + axes[0], 1 + axes[1], 1 + axes[2])  # classes, then the CT's axis order
        src = torch.from_numpy(np.ascontiguousarray(probs.transpose(order)))
        parts.append((src, taps, inside))
    labels = np.zeros(ct.shape, np.uint8)
    background = np.full(ct.shape, 255, np.uint8)
    for k0 in range(0, ct.shape[2], slab):
        k1 = min(ct.shape[2], k0 + slab)
        total, here = None, None
        for src, ((l0, h0, w0, _), (l1, h1, w1, _), (l2, h2, w2, _)), inside in parts:
            x = torch.lerp(src.index_select(3, l2[k0:k1]).float(), src.index_select(3, h2[k0:k1]).float(),
                           w2[k0:k1].view(1, 1, 1, -1))
            x = torch.lerp(x.index_select(1, l0), x.index_select(1, h0), w0.view(1, -1, 1, 1))
            x = torch.lerp(x.index_select(2, l1), x.index_select(2, h1), w1.view(1, 1, -1, 1))
            total = x if total is None else total.add_(x)
            here = inside[:, :, k0:k1] if here is None else here & inside[:, :, k0:k1]
        total /= len(parts)
        lab = total.argmax(0).numpy().astype(np.uint8)
        lab[~here] = 0
        labels[:, :, k0:k1] = lab
        bg = total[0].add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()
        background[:, :, k0:k1] = np.where(here, bg, 255)
    return labels, background


def measure_case(model, ph, opts: PhantomOptions) -> dict:
    """Every variant's figures for one phantom CT."""
    from seg import labels as L
    from seg.evaluate import evaluate_case, side_volumes
    from seg.hu_refine import refine_labels
    from seg.infer import predict_probabilities
    from seg.preprocess import to_model_grid
    from seg.train import plan_record

    ct, truth = ph.ct, ph.labels
    mg = to_model_grid(ct, model.preprocess)
    image_s, affine_s = shifted_image(ct, mg.affine, mg.image.shape, model.preprocess, np.full(3, 0.5))
    flipped = predict_probabilities(model, np.ascontiguousarray(image_s[::-1]), mirror=False)
    passes = {
        "A": (predict_probabilities(model, mg.image, mirror=True), mg.affine),
        "B": (predict_probabilities(model, image_s, mirror=True), affine_s),
        "C": (predict_probabilities(model, mg.image, mirror=False), mg.affine),
        "D": (np.ascontiguousarray(flipped[:, ::-1]), affine_s),
    }
    rule = model.inference.hu_refinement
    out: dict = {"seed": opts.seed, "postop": opts.postop, "opts": plan_record(opts), "variants": {},
                 "truth_sides": [[n, s, v] for (n, s), v in side_volumes(truth).items()]}
    for name, keys in VARIANTS.items():
        labels, background = averaged_labels([passes[k] for k in keys], ct)
        refined = refine_labels(ct.array, labels, ct.spacing_mm, rule, background=background)
        out["variants"][name] = {}
        for tag, lab in (("network", labels), ("refined", refined)):
            r = evaluate_case(ct.with_array(lab), truth, hd95=False)
            out["variants"][name][tag] = {
                "dice": [r.per_class[m].dice for m in L.ANALYSED_MUSCLES],
                "volume_error_pct": [r.per_class[m].volume_error_pct for m in L.ANALYSED_MUSCLES],
                "sides": [[n, s, v] for (n, s), v in side_volumes(ct.with_array(lab)).items()],
            }
    return out


def report(rows: list[dict]) -> None:
    from seg.evaluate import atrophy_loss_records
    from seg.phantom import PhantomOptions

    pre = {r["seed"]: r for r in rows if not r["postop"]}
    pairs = [(pre[r["seed"]], r) for r in rows if r["postop"] and r["seed"] in pre]
    print(f"{len(pairs)} post-operative phantoms and their twins")
    print(f"{'variant':8} {'labels':8} {'Dice':>7} {'med |vol|':>9} {'loss err med':>12} {'worst':>6} "
          f"{'within 5':>9}")
    for tag in ("network", "refined"):
        for name in VARIANTS:
            dice, vol, loss = [], [], []
            for a, b in pairs:
                sides = []
                for r in (a, b):
                    v = r["variants"][name][tag]
                    dice.append(np.mean(v["dice"]))
                    vol += [abs(e or 0.0) for e in v["volume_error_pct"]]
                    sides.append(({(n, s): x for n, s, x in v["sides"]},
                                  {(n, s): x for n, s, x in r["truth_sides"]}))
                post_opts = PhantomOptions(**b["opts"])
                loss += [abs(q.error_pp) for q in atrophy_loss_records(post_opts, sides[0], sides[1])]
            e = np.asarray(loss)
            print(f"{name:8} {tag:8} {np.mean(dice):7.4f} {np.median(vol):8.2f}% {np.median(e):10.1f}pp "
                  f"{e.max():6.1f} {int((e <= 5).sum()):>4}/{len(e)}")


def main() -> None:
    from seg.evaluate import preop_twin_options
    from seg.model import load_model
    from seg.phantom import make_phantom
    from seg.train import phantom_plan

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--seed-start", type=int, default=6000)
    ap.add_argument("--model", default="seg/models/demo")
    ap.add_argument("--out", type=Path, default=Path("grid_shift_tta.jsonl"))
    ap.add_argument("--report", action="store_true", help="print the table of --out and stop")
    a = ap.parse_args()
    rows = [json.loads(x) for x in a.out.read_text().splitlines()] if a.out.exists() else []
    if not a.report:
        torch.set_num_threads(2)
        model = load_model(a.model)
        done = {(r["seed"], r["postop"]) for r in rows}
        posts = [o for o in phantom_plan(4 * a.pairs + a.seed_start % 4, a.seed_start) if o.postop]
        for o in posts[: a.pairs]:
            for opts in (preop_twin_options(o), o):
                if (opts.seed, opts.postop) in done:
                    continue
                t0 = time.monotonic()
                row = measure_case(model, make_phantom(opts), opts)
                rows.append(row)
                with a.out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"seed {opts.seed} {'post' if row['postop'] else 'pre '} "
                      f"{time.monotonic() - t0:.0f} s", flush=True)
    report(rows)


if __name__ == "__main__":
    main()
