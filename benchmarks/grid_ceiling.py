"""What a model grid can reach at best: a perfect model-grid prediction mapped back onto the CT grid.

For each held-out phantom the truth is taken onto the model grid, either as nearest-neighbour labels
(one-hot) or as partial-volume class fractions, and brought back exactly as inference brings a
prediction back (linear interpolation of probabilities, argmax on the CT grid). The Dice and volume
errors that remain are the grid's own ceiling: no amount of training beats them. ``fractions+hu``
adds the HU refinement of the label edges (:mod:`seg.hu_refine`) with the rule ``dicomnode train``
exports (claims gated by the fractions' background), as the demo package asks for. ``--atrophy``
measures the atrophied muscles' pre->post loss error of the same perfect model.

    .venv/bin/python benchmarks/grid_ceiling.py --phantoms 5 --spacings 4,3
    .venv/bin/python benchmarks/grid_ceiling.py --atrophy --phantoms 24 --spacings 4,3
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def _backs(ph, sp: float) -> dict[str, np.ndarray]:
    """The truth taken onto a ``sp`` mm model grid and back onto the CT grid, per kind of target."""
    from seg import labels as L
    from seg.hu_refine import refine_labels
    from seg.infer import probabilities_to_labels, resample_prediction
    from seg.preprocess import labels_to_model_probs, to_model_grid
    from seg.preprocess_config import PreprocessConfig
    from seg.train import EXPORTED_HU_REFINEMENT

    mg = to_model_grid(ph.ct, PreprocessConfig(spacing_mm=(sp, sp, sp)), ph.labels)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(mg.labels.astype(np.int64)), L.NUM_CLASSES)
    targets = {
        "nearest": (onehot.permute(3, 0, 1, 2).numpy() * 255).astype(np.uint8),
        "fractions": labels_to_model_probs(ph.labels, mg.affine, mg.image.shape, L.NUM_CLASSES),
    }
    fractions = resample_prediction(targets["fractions"], mg.affine, ph.ct, background=True)
    backs = {"nearest": probabilities_to_labels(targets["nearest"], mg.affine, ph.ct),
             "fractions": fractions.labels}
    backs["fractions+hu"] = refine_labels(ph.ct.array, fractions.labels, ph.ct.spacing_mm,
                                          EXPORTED_HU_REFINEMENT, background=fractions.background)
    return backs


def ceiling(phantoms: int, seed_start: int, spacings: list[float]) -> list[dict]:
    from seg import labels as L
    from seg.evaluate import evaluate_case
    from seg.phantom import make_phantom
    from seg.train import phantom_plan

    rows = []
    for o in phantom_plan(phantoms, seed_start):
        ph = make_phantom(o)
        truth = ph.ct.with_array(np.asarray(ph.labels.array).astype(np.uint8))
        for sp in spacings:
            for kind, labels in _backs(ph, sp).items():
                back = ph.ct.with_array(labels)
                r = evaluate_case(back, truth, hd95=False)
                dice = [r.per_class[m].dice for m in L.ANALYSED_MUSCLES]
                errs = [abs(r.per_class[m].volume_error_pct or 0.0) for m in L.ANALYSED_MUSCLES]
                rows.append({
                    "seed": o.seed, "ct_spacing": o.spacing_mm, "grid_mm": sp, "targets": kind,
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


def atrophy_ceiling(phantoms: int, seed_start: int, spacings: list[float]) -> list[dict]:
    """The atrophied muscles' pre->post loss error of a perfect model: each post-operative
    phantom of the held-out plan and its pre-operative twin through the same grid round trip."""
    from seg.evaluate import atrophy_loss_records, preop_twin_options, side_volumes
    from seg.phantom import make_phantom
    from seg.train import phantom_plan

    rows = []
    for o in phantom_plan(phantoms, seed_start):
        if not (o.postop and o.atrophy and o.implant_side):
            continue
        sides = {}
        for when, opts in (("post", o), ("pre", preop_twin_options(o))):
            ph = make_phantom(opts)
            truth = side_volumes(ph.ct.with_array(np.asarray(ph.labels.array).astype(np.uint8)))
            for sp in spacings:
                for kind, labels in _backs(ph, sp).items():
                    sides[(when, sp, kind)] = (side_volumes(ph.ct.with_array(labels)), truth)
        for sp, kind in sorted({(sp, k) for _, sp, k in sides}, reverse=True):
            for r in atrophy_loss_records(o, sides[("pre", sp, kind)], sides[("post", sp, kind)]):
                rows.append({"grid_mm": sp, "targets": kind, **r.model_dump()})
                print("{case} grid {grid_mm:g} mm {targets:<12} {muscle:<22} "
                      "loss {measured_loss_pct:6.2f} % truth {truth_loss_pct:6.2f} % "
                      "error {error_pp:+6.2f} pp".format(**rows[-1]), flush=True)
    return rows


def atrophy_summary(rows: list[dict]) -> str:
    keys = sorted({(r["grid_mm"], r["targets"]) for r in rows}, reverse=True)
    out = ["| grid | targets | muscles | median abs error | worst | within 5 pp |",
           "|---|---|---:|---:|---:|---:|"]
    for g, t in keys:
        err = np.abs([r["error_pp"] for r in rows if r["grid_mm"] == g and r["targets"] == t])
        out.append(f"| {g:g} mm | {t} | {len(err)} | {np.median(err):.1f} pp | {err.max():.1f} pp | "
                   f"{int((err <= 5).sum())}/{len(err)} |")
    return "\n".join(out)


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
    ap.add_argument("--atrophy", action="store_true",
                    help="the atrophied muscles' pre->post loss error instead "
                    "(post-operative phantoms and their twins)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    spacings = [float(v) for v in a.spacings.split(",")]
    if a.atrophy:
        print(atrophy_summary(atrophy_ceiling(a.phantoms, a.seed_start, spacings)))
    else:
        print(summary(ceiling(a.phantoms, a.seed_start, spacings)))


if __name__ == "__main__":
    main()
