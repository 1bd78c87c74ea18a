"""What a model grid can reach at best: a perfect model-grid prediction mapped back onto the CT grid.

For each held-out phantom the truth is taken onto the model grid, either as nearest-neighbour labels
(one-hot) or as partial-volume class fractions, and brought back exactly as inference brings a
prediction back (linear interpolation of probabilities, argmax on the CT grid). The Dice and volume
errors that remain are the grid's own ceiling: no amount of training beats them. ``fractions+hu``
adds the HU refinement of the label edges (:mod:`seg.hu_refine`), as the demo package asks for.

    .venv/bin/python benchmarks/grid_ceiling.py --phantoms 5 --spacings 4,3
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def ceiling(phantoms: int, seed_start: int, spacings: list[float]) -> list[dict]:
    from seg import labels as L
    from seg.evaluate import evaluate_case, heldout_plan
    from seg.hu_refine import HURefinement, refine_labels
    from seg.infer import probabilities_to_labels
    from seg.phantom import PhantomOptions, make_phantom
    from seg.preprocess import PreprocessConfig, labels_to_model_probs, to_model_grid

    rows = []
    for o in heldout_plan(phantoms, seed_start):
        ph = make_phantom(PhantomOptions(**o))
        truth = ph.ct.with_array(np.asarray(ph.labels.array).astype(np.uint8))
        for sp in spacings:
            mg = to_model_grid(ph.ct, PreprocessConfig(spacing_mm=(sp, sp, sp)), ph.labels)
            onehot = torch.nn.functional.one_hot(torch.as_tensor(mg.labels.astype(np.int64)), L.NUM_CLASSES)
            targets = {
                "nearest": (onehot.permute(3, 0, 1, 2).numpy() * 255).astype(np.uint8),
                "fractions": labels_to_model_probs(ph.labels, mg.affine, mg.image.shape, L.NUM_CLASSES),
            }
            backs = {k: probabilities_to_labels(p, mg.affine, ph.ct) for k, p in targets.items()}
            backs["fractions+hu"] = refine_labels(ph.ct.array, backs["fractions"], ph.ct.spacing_mm,
                                                  HURefinement())
            for kind, labels in backs.items():
                back = ph.ct.with_array(labels)
                r = evaluate_case(back, truth, hd95=False)
                dice = [r.per_class[m].dice for m in L.ANALYSED_MUSCLES]
                errs = [abs(r.per_class[m].volume_error_pct or 0.0) for m in L.ANALYSED_MUSCLES]
                rows.append({
                    "seed": o["seed"], "ct_spacing": o["spacing_mm"], "grid_mm": sp, "targets": kind,
                    "mean_dice": float(np.mean(dice)), "min_dice": float(min(dice)),
                    "femur_dice": r.per_class["femur"].dice,
                    "total_volume_error_pct": r.total_muscle_volume_error_pct,
                    "median_abs_volume_error_pct": float(np.median(errs)),
                })
                print("seed {seed} CT {ct_spacing} grid {grid_mm:g} mm {targets:<12} "
                      "mean Dice {mean_dice:.4f} min {min_dice:.4f} femur {femur_dice:.4f} "
                      "total vol {total_volume_error_pct:+.2f} % "
                      "median |vol| {median_abs_volume_error_pct:.2f} %".format(**rows[-1]), flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    keys = sorted({(r["grid_mm"], r["targets"]) for r in rows}, reverse=True)
    out = ["| grid | targets | mean Dice | lowest muscle | femur | total volume | median abs volume |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for g, t in keys:
        sel = [r for r in rows if r["grid_mm"] == g and r["targets"] == t]

        def m(k: str, sel: list[dict] = sel) -> float:
            return float(np.mean([r[k] for r in sel]))

        out.append(f"| {g:g} mm | {t} | {m('mean_dice'):.3f} | {m('min_dice'):.3f} | {m('femur_dice'):.3f} | "
                   f"{m('total_volume_error_pct'):+.2f} % | {m('median_abs_volume_error_pct'):.2f} % |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phantoms", type=int, default=5)
    ap.add_argument("--seed-start", type=int, default=5000)
    ap.add_argument("--spacings", default="4,3", help="model-grid spacings in mm")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = ceiling(a.phantoms, a.seed_start, [float(v) for v in a.spacings.split(",")])
    print(summary(rows))


if __name__ == "__main__":
    main()
