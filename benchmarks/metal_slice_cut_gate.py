"""How the HU refinement's cut gate in slices with metal moves the post-operative figures.

``HURefinement.metal_slice_cut_min_background`` lets the refinement cut a muscle voxel of a slice
holding metal as fat only where the network's background probability is at least the gate. This
walks the plan of ``dicomnode evaluate --phantoms N --seed-start S``; for every post-operative case
with atrophy, and its pre-operative twin, the network runs once and the package's own refinement is
applied with each gate (and without one, the package's rule as written otherwise). Per gate: mean
muscle Dice of the post-operative cases and of the twins, and the atrophied muscles' loss error
(:func:`seg.evaluate.atrophy_loss_records`). Choose the gate on seeds no held-out figure uses
(analysis seeds 6000 on), then report the held-out evaluation:

    .venv/bin/python benchmarks/metal_slice_cut_gate.py --seed-start 6000 --gates 0.05,0.1,0.15,0.2
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

TARGET_PP = 5.0  # the bound on a loss error (docs/models.md targets)


def _label_maps(ct, model, rules):  # noqa: ANN001, ANN202
    """One label map per rule, from one network pass."""
    from seg.infer import network_pass

    done = network_pass(ct, model, background=True)
    return [done.labels(r) for r in rules]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model package folder (default: the shipped demo model)")
    ap.add_argument("--phantoms", type=int, default=24, help="cases in the plan (default: %(default)s)")
    ap.add_argument("--seed-start", type=int, default=6000, help="first seed (default: %(default)s)")
    ap.add_argument("--gates", default="0.05,0.1,0.15,0.2", help="gates to try, comma-separated")
    args = ap.parse_args(argv)

    from seg.evaluate import atrophy_loss_records, evaluate_case, preop_twin_options, side_volumes
    from seg.model import load_model
    from seg.train import phantom_plan, plan_phantom

    model = load_model(args.model, device="cpu")
    base = model.inference.hu_refinement
    if base is None:
        raise SystemExit("the package asks for no HU refinement: nothing to gate")
    gates = [float(g) for g in args.gates.split(",")]
    names = ["none", *(f"{g:g}" for g in gates)]
    rules = [base.model_copy(update={"metal_slice_cut_min_background": None}),
             *(base.model_copy(update={"metal_slice_cut_min_background": g}) for g in gates)]
    errors: list[list[float]] = [[] for _ in rules]
    post_dice: list[list[float]] = [[] for _ in rules]
    pre_dice: list[list[float]] = [[] for _ in rules]
    for o in phantom_plan(args.phantoms, args.seed_start):
        if not (o.postop and o.atrophy and o.implant_side):
            continue
        post, twin = plan_phantom(o, None), plan_phantom(preop_twin_options(o), None)
        truths = [ph.ct.with_array(np.asarray(ph.labels.array).astype(np.uint8)) for ph in (twin, post)]
        t_pre, t_post = (side_volumes(t) for t in truths)
        pairs = zip(_label_maps(twin.ct, model, rules), _label_maps(post.ct, model, rules), strict=True)
        for i, (lp, lq) in enumerate(pairs):
            recs = atrophy_loss_records(o, (side_volumes(lp), t_pre), (side_volumes(lq), t_post))
            errors[i] += [abs(r.error_pp) for r in recs]
            pre_dice[i].append(evaluate_case(lp, truths[0], hd95=False).mean_dice_muscles or 0.0)
            post_dice[i].append(evaluate_case(lq, truths[1], hd95=False).mean_dice_muscles or 0.0)
        print(f"seed {o.seed}: worst loss error " + ", ".join(
            f"{n} {max(e[-len(recs):]):.1f}" for n, e in zip(names, errors, strict=True)), flush=True)
    print(f"{'gate':<6}{'post Dice':>10}{'pre Dice':>10}{'median pp':>10}{'worst pp':>9}{'within 5':>10}")
    for n, e, qd, pd in zip(names, errors, post_dice, pre_dice, strict=True):
        print(f"{n:<6}{np.mean(qd):>10.4f}{np.mean(pd):>10.4f}{statistics.median(e):>10.2f}{max(e):>9.1f}"
              f"{sum(v <= TARGET_PP for v in e):>6}/{len(e)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
