"""What metal artefact reduction (seg.mar) does to the atrophy loss the shipped model measures.

For each held-out post-operative phantom (``seg.train.phantom_plan``, as ``dicomnode evaluate
--phantoms 24 --seed-start 5000`` draws them) the pre-operative twin and the post-operative case
are segmented; the post-operative CT once as rendered and once after :func:`seg.mar.
reduce_metal_artefacts` (its default :class:`seg.mar.MarConfig`). One line per atrophied muscle: its true
loss and the loss error (pp) of each column, then a summary per column and MAR's time per case.
It renders the repository's phantom, whatever its version (drawn or physical streaks).

    PYTHONPATH=$PWD nice -n 5 .venv/bin/python benchmarks/mar_effect.py 5003 5015 5019
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("seeds", type=int, nargs="+", help="post-operative held-out seeds (5003 5015 ...)")
    ap.add_argument("--model", default=None, help="model package folder (default: the shipped demo model)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    args = ap.parse_args(argv)

    from seg.evaluate import atrophy_loss_records, preop_twin_options, side_volumes
    from seg.infer import segment
    from seg.mar import reduce_metal_artefacts
    from seg.model import load_model
    from seg.phantom import PHANTOM_VERSION
    from seg.train import phantom_plan, plan_phantom

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    plan = {p.seed: p for p in phantom_plan(24, 5000)}
    cols = ["no MAR", "MAR"]
    print(f"phantom {PHANTOM_VERSION}; model {model.info.name} {model.info.version}")
    print(f"{'case':<6}{'muscle':<22}{'truth%':>7}" + "".join(f"{c:>9}" for c in cols))
    errors: list[list[float]] = [[] for _ in cols]
    for seed in args.seeds:
        o = plan[seed]
        if not o.postop:
            raise SystemExit(f"seed {seed} is not post-operative")
        post, twin = plan_phantom(o, None), plan_phantom(preop_twin_options(o), None)

        def truth(ph):  # noqa: ANN001, ANN202
            return side_volumes(ph.ct.with_array(np.asarray(ph.labels.array).astype(np.uint8)))

        pre = (side_volumes(segment(twin.ct, model)), truth(twin))
        t0 = time.perf_counter()
        cts = [post.ct, reduce_metal_artefacts(post.ct)]
        mar_s = time.perf_counter() - t0
        recs = [atrophy_loss_records(o, pre, (side_volumes(segment(ct, model)), truth(post))) for ct in cts]
        for row in zip(*recs, strict=True):
            a = row[0]
            print(f"{seed:<6}{a.muscle:<22}{a.truth_loss_pct:>7.2f}"
                  + "".join(f"{r.error_pp:>+9.2f}" for r in row))
            for e, r in zip(errors, row, strict=True):
                e.append(abs(r.error_pp))
        print(f"{seed:<6}CT {post.ct.shape} at {post.ct.spacing_mm[0]:g} mm; MAR {mar_s:.1f} s", flush=True)
    for c, e in zip(cols, errors, strict=True):
        print(f"{c:<9} n={len(e)} median {statistics.median(e):4.1f} pp, max {max(e):5.1f} pp, "
              f"within 5 pp: {sum(v <= 5 for v in e)}/{len(e)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
