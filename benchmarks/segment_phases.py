"""Whole-thigh segmentation time by phase, beside the machine's own matmul throughput.

Issue #11 asks for a 1.5 mm whole-thigh CT in at most 15 s on 2 CPU cores. The shared VMs this
project runs on vary by more than 2x from day to day, so the time is printed next to a 2048² fp32
``torch.matmul`` measured in the same run. Phases are those of :func:`seg.infer.segment`: the
model grid (preprocessing), the network (mirrored where the package asks for it), the resampling
back onto the CT grid and the HU refinement of the label edges (with the network's background
probability on the CT grid where the package's rule asks for it). ``--mar`` renders the phantom
post-operative (implant on the left) and times the metal artefact reduction (:mod:`seg.mar`) first,
as ``segment`` runs it for a package that asks for it (LI for one that does not).

    .venv/bin/python benchmarks/segment_phases.py --repeats 2
    .venv/bin/python benchmarks/segment_phases.py --repeats 2 --mar --spacing 1.0
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    """Sustained fp32 matmul throughput of this process's threads (GFLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model package folder (default: the shipped demo model)")
    ap.add_argument("--seed", type=int, default=424242, help="phantom seed (default: %(default)s)")
    ap.add_argument("--spacing", type=float, default=1.5, help="CT spacing, mm (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--mar", action="store_true", help="post-operative phantom; time seg.mar first")
    args = ap.parse_args(argv)

    from seg.evaluate import evaluate_case
    from seg.hu_refine import refine_labels
    from seg.infer import predict_probabilities, resample_prediction
    from seg.mar import as_configured
    from seg.metal_proximity import slices_with_metal
    from seg.model import load_model
    from seg.phantom import PhantomOptions, make_phantom
    from seg.preprocess import to_model_grid

    torch.set_num_threads(args.threads)
    pkg = load_model(args.model, device="cpu")
    rule = pkg.inference.hu_refinement
    # the package's own reduction (LI, and its learned streak correction where it has one); LI for one
    # that asks for none
    reduction = pkg.preprocess.metal_artefact_reduction
    reduction = "li" if reduction == "none" else reduction
    post = {"postop": True, "implant_side": "left"} if args.mar else {}
    ph = make_phantom(PhantomOptions(seed=args.seed, spacing_mm=(args.spacing,) * 3, **post))
    metal = f", {int(slices_with_metal(ph.ct.array).sum())} slices with metal" if args.mar else ""
    print(f"{pkg.info.name} {pkg.info.version}; CT {ph.ct.shape} at {args.spacing} mm{metal}; "
          f"{args.threads} threads; fp32 matmul {matmul_gflops():.0f} GFLOP/s")
    for run in range(1, args.repeats + 1):
        tm = time.perf_counter()
        ct = as_configured(ph.ct, reduction, pkg.streak_net) if args.mar else ph.ct
        t0 = time.perf_counter()
        mar = f"MAR {t0 - tm:.1f} s, " if args.mar else ""
        mg = to_model_grid(ct, pkg.preprocess)
        t1 = time.perf_counter()
        probs = predict_probabilities(pkg, mg.image, precision="fp32")
        t2 = time.perf_counter()
        back = resample_prediction(probs, mg.affine, ct,
                                   background=rule is not None and rule.reads_background)
        t3 = time.perf_counter()
        refined = back.labels
        if rule is not None:
            refined = refine_labels(ct.array, back.labels, ct.spacing_mm, rule, background=back.background)
        t4 = time.perf_counter()
        print(f"run {run}: {mar}preprocess {t1 - t0:.1f} s, network {t2 - t1:.1f} s, "
              f"back {t3 - t2:.1f} s, refine {t4 - t3:.1f} s, total {t4 - tm:.1f} s")
    print(f"fp32 matmul after: {matmul_gflops():.0f} GFLOP/s")
    truth = ct.with_array(np.asarray(ph.labels.array).astype(np.uint8))
    dice = evaluate_case(ct.with_array(refined), truth, hd95=False).mean_dice_muscles
    print(f"mean muscle Dice of the last run: {dice:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
