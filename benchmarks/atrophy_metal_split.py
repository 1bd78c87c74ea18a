"""Where the atrophy loss error comes from: each post-operative case with and without its implant.

The held-out plan of ``dicomnode evaluate --phantoms N --seed-start S`` is walked; for every
post-operative case with atrophy, three phantoms are segmented by the package (network and HU
refinement, as the node measures): the pre-operative twin (:func:`seg.evaluate.preop_twin_options`),
the post-operative case, and the same case with ``postop=False``: the same patient, atrophy and fat
infiltration on the same side, only the implant and its streak artefacts left out. Each atrophied
muscle's pre->post loss is then compared with the truth twice (:func:`seg.evaluate.atrophy_loss_records`),
so the table shows how much of the error the metal brings.

    .venv/bin/python benchmarks/atrophy_metal_split.py --phantoms 24 --seed-start 5000
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import numpy as np

TARGET_PP = 5.0  # the bound on a loss error (docs/models.md targets)


@dataclass(frozen=True)
class SplitRow:
    """One atrophied muscle on the operated side: its loss error with and without the implant."""

    case: str
    muscle: str
    truth_loss_pct: float
    error_with_implant_pp: float
    error_without_implant_pp: float


def _sides(opts, model):
    """(measured, true) side volumes of one phantom."""
    from seg.evaluate import side_volumes
    from seg.infer import segment
    from seg.train import plan_phantom

    ph = plan_phantom(opts, None)
    truth = ph.ct.with_array(np.asarray(ph.labels.array).astype(np.uint8))
    return side_volumes(segment(ph.ct, model)), side_volumes(truth)


def split(model, phantoms: int, seed_start: int) -> list[SplitRow]:
    from seg.evaluate import atrophy_loss_records, preop_twin_options
    from seg.train import phantom_plan

    rows = []
    for opts in phantom_plan(phantoms, seed_start):
        if not (opts.postop and opts.atrophy and opts.implant_side):
            continue
        pre = _sides(preop_twin_options(opts), model)
        with_metal = atrophy_loss_records(opts, pre, _sides(opts, model))
        without = atrophy_loss_records(opts, pre, _sides(replace(opts, postop=False), model))
        for a, b in zip(with_metal, without, strict=True):
            rows.append(SplitRow(a.case, a.muscle, a.truth_loss_pct, a.error_pp, b.error_pp))
            print(f"{a.case:9} {a.muscle.replace('_', ' '):24} truth {a.truth_loss_pct:5.1f} %  "
                  f"error {a.error_pp:+6.1f} pp, without implant {b.error_pp:+6.1f} pp", flush=True)
    return rows


def summary(rows: list[SplitRow]) -> str:
    lines = []
    for label, errors in (("with implant", [abs(r.error_with_implant_pp) for r in rows]),
                          ("without implant", [abs(r.error_without_implant_pp) for r in rows])):
        within = sum(e <= TARGET_PP for e in errors)
        lines.append(f"{label:16} median {np.median(errors):4.1f} pp, max {max(errors):5.1f} pp, "
                     f"within {TARGET_PP:g} pp: {within} of {len(errors)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model package folder (default: the shipped demo model)")
    ap.add_argument("--phantoms", type=int, default=24, help="held-out plan length (default 24)")
    ap.add_argument("--seed-start", type=int, default=5000, help="first held-out seed (default 5000)")
    args = ap.parse_args()
    from seg.model import load_model

    rows = split(load_model(args.model), args.phantoms, args.seed_start)
    if not rows:
        raise SystemExit("no post-operative case with atrophy in this plan: give more --phantoms")
    print(summary(rows))


if __name__ == "__main__":
    main()
