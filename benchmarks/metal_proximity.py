"""Calibrate the near-metal flag: how a muscle's volume error relates to its share next to metal.

Post-operative analysis phantoms (seeds 6000 on, every 4th post-operative: neither training
1000-1385 nor held-out 5000-5099) and their pre-operative twins are segmented by the package
(network and HU refinement, as the node measures). For every analysed muscle side of each
post-operative case the share of its *measured* voxels within R mm of metal in their own slice
(:mod:`seg.metal_proximity`, metal by the QA's rule) is related to its volume error against the
truth and to the error of its pre->post loss against the true loss (what a change report reads;
the model's own bias on the muscle, seen in the twin, cancels). A muscle side is "large" when its
loss is off by more than ``--large`` pp; each rule (reach R, share at least S) is scored on the
operated side (the other has no metal and is never flagged) by how many large ones it flags and how
many others, and the table's pick is printed. Predictions are cached in ``--cache`` so rules can be
tried again without segmenting.

    .venv/bin/python benchmarks/metal_proximity.py --pairs 10 --cache /tmp/metal-cache
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REACHES_MM = (10.0, 20.0, 30.0, 40.0, 60.0)
SHARES = (0.0, 0.02, 0.05, 0.1, 0.2)
MOST_OTHERS = 0.25  # a rule may flag at most this share of the operated side's other muscles


@dataclass(frozen=True)
class MuscleSide:
    """One analysed muscle on one side of one post-operative case."""

    seed: int
    muscle: str
    operated: bool
    atrophied: bool
    error_pct: float  # measured against true volume, post-operative
    twin_error_pct: float  # the same muscle side in the pre-operative twin
    loss_error_pp: float  # measured pre->post loss minus the true loss
    shares: tuple[float, ...]  # within each of REACHES_MM of metal

    def flagged(self, reach: int, share: float) -> bool:
        return self.shares[reach] > 0 and self.shares[reach] >= share


def _segment_cached(opts, model, cache: Path | None) -> np.ndarray:
    from seg.infer import segment
    from seg.phantom import make_phantom

    path = cache / f"{opts.seed}-{'post' if opts.postop else 'pre'}.npz" if cache else None
    if path is not None and path.exists():
        return np.load(path)["pred"]
    pred = np.asarray(segment(make_phantom(opts).ct, model).array).astype(np.uint8)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, pred=pred)
    return pred


def _case(opts, model, cache: Path | None) -> list[MuscleSide]:
    from seg.evaluate import preop_twin_options, side_volumes
    from seg.labels import ANALYSED_MUSCLES, LABEL_OF, NUM_CLASSES
    from seg.measure import midline_x
    from seg.metal_proximity import METAL_HU, MetalBox, near_metal_counts
    from seg.phantom import make_phantom

    twin_opts = preop_twin_options(opts)
    post, twin = make_phantom(opts), make_phantom(twin_opts)
    pred, twin_pred = _segment_cached(opts, model, cache), _segment_cached(twin_opts, model, cache)
    pv, tv = side_volumes(post.ct.with_array(pred)), side_volumes(post.labels)
    qv, uv = side_volumes(twin.ct.with_array(twin_pred)), side_volumes(twin.labels)
    labels = post.ct.with_array(pred)
    mid, _ = midline_x(labels, post.ct)
    metal = MetalBox.of(np.asarray(post.ct.array) > METAL_HU)
    assert metal is not None, f"seed {opts.seed}: no metal"
    near = [near_metal_counts(pred, metal, labels.affine, mid, NUM_CLASSES, r) for r in REACHES_MM]
    vox = labels.voxel_volume_cm3
    out = []
    for name in ANALYSED_MUSCLES:
        lab = LABEL_OF[name]
        for side in ("left", "right"):
            truth, meas = tv[(name, side)], pv[(name, side)]
            pre_t, pre_m = uv[(name, side)], qv[(name, side)]
            shares = []
            for total, left in near:
                n = left[lab] if side == "left" else total[lab] - left[lab]
                shares.append(float(n) * vox / meas if meas else 0.0)
            loss_t = (1 - truth / pre_t) * 100 if pre_t else 0.0
            loss_m = (1 - meas / pre_m) * 100 if pre_m else 0.0
            out.append(MuscleSide(
                opts.seed, name, side == opts.implant_side, name in opts.atrophy,
                (meas / truth - 1) * 100 if truth else 0.0, (pre_m / pre_t - 1) * 100 if pre_t else 0.0,
                loss_m - loss_t, tuple(shares)))
    return out


def _large(r: MuscleSide, large: float) -> bool:
    return abs(r.loss_error_pp) > large


def _rule_table(rows: list[MuscleSide], large: float) -> tuple[int, float]:
    """Per rule, on the operated side: large ones flagged / others flagged; returns, of the rules that
    flag at most :data:`MOST_OTHERS` of the others, the one with the largest difference of the two
    rates (flagged share of the large ones minus that of the others)."""
    operated = [r for r in rows if r.operated]  # the other side: no metal, never flagged
    big = [r for r in operated if _large(r, large)]
    rest = [r for r in operated if not _large(r, large)]
    print(f"\nflagged operated-side muscles: large ones (loss off by > {large:g} pp, n={len(big)}) "
          f"/ others (n={len(rest)})")
    print(f"{'reach':>6}" + "".join(f" {'>0' if s == 0 else f'>={s:.0%}':>9}" for s in SHARES))
    best, score = (0, 0.0), -1.0
    for i, reach in enumerate(REACHES_MM):
        cells = ""
        for s in SHARES:
            hit, other = sum(r.flagged(i, s) for r in big), sum(r.flagged(i, s) for r in rest)
            cells += f" {hit:>3}/{other:<5}"
            if other <= MOST_OTHERS * len(rest) and hit / len(big) - other / len(rest) > score:
                best, score = (i, s), hit / len(big) - other / len(rest)
        print(f"{reach:4.0f}mm{cells}")
    return best


def _groups(rows: list[MuscleSide], reach: int, share: float, large: float) -> None:
    """|loss error| of the flagged sides, the operated side's others and the other side's."""
    print(f"\nat {REACHES_MM[reach]:g} mm, share >= {share:.0%}: |loss error| (pp)")
    print(f"{'muscle sides':26} {'n':>4} {'median':>7} {'90th':>6} {'> ' + f'{large:g}':>5}")
    groups = (("flagged", [r for r in rows if r.flagged(reach, share)]),
              ("operated side, not flagged", [r for r in rows if r.operated and not r.flagged(reach, share)]),
              ("other side", [r for r in rows if not r.operated]))
    for name, group in groups:
        err = np.abs([r.loss_error_pp for r in group]) if group else np.zeros(1)
        print(f"{name:26} {len(group):>4} {np.median(err):7.1f} {np.percentile(err, 90):6.1f} "
              f"{int((err > large).sum()):>5}")


def _muscle_table(rows: list[MuscleSide], reach: int, share: float, large: float) -> None:
    shown = [r for r in rows if r.flagged(reach, share) or _large(r, large)]
    print(f"\nmuscle sides flagged at {REACHES_MM[reach]:g} mm, share >= {share:.0%}, or with a loss "
          f"off by more than {large:g} pp (op: operated side, *: atrophied)")
    print(f"{'seed':>5} {'muscle':22} {'side':>4} {'share':>6} {'error':>7} {'twin':>6} "
          f"{'loss':>6} flag")
    for r in sorted(shown, key=lambda r: (r.seed, -r.shares[reach])):
        side = ("op" if r.operated else "con") + ("*" if r.atrophied else "")
        print(f"{r.seed:>5} {r.muscle.replace('_', ' ')[:22]:22} {side:>4} {r.shares[reach]:6.0%} "
              f"{r.error_pct:+6.1f}% {r.twin_error_pct:+5.1f}% {r.loss_error_pp:+6.1f} "
              f"{'yes' if r.flagged(reach, share) else ''}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model package (default: the shipped demo)")
    ap.add_argument("--seed-start", type=int, default=6000, help="first seed of the plan (post-op every 4th)")
    ap.add_argument("--pairs", type=int, default=10, help="post-operative cases (and their twins)")
    ap.add_argument("--large", type=float, default=5.0,
                    help="a loss error above this (pp) is large (the project's target: 5)")
    ap.add_argument("--muscles", action="store_true", help="list the flagged and the large muscle sides")
    ap.add_argument("--cache", type=Path, default=None, help="folder keeping the predicted label maps")
    args = ap.parse_args(argv)

    from seg.metal_proximity import NEAR_METAL_MM, NEAR_METAL_SHARE
    from seg.model import load_model
    from seg.train import phantom_plan

    if args.seed_start < 6000:
        raise SystemExit("seeds below 6000 are training or held-out phantoms: calibrate on 6000 on")
    model = load_model(args.model, device="cpu")
    post = [o for o in phantom_plan(4 * args.pairs, args.seed_start) if o.postop]
    rows = [r for opts in post for r in _case(opts, model, args.cache)]
    print(f"{model.info.name} {model.info.version}: {len(post)} post-operative phantoms "
          f"(seeds {post[0].seed}-{post[-1].seed}), {len(rows)} analysed muscle sides")
    best = _rule_table(rows, args.large)
    print(f"picked (flagging at most {MOST_OTHERS:.0%} of the others, the largest difference of the "
          f"rates): {REACHES_MM[best[0]]:g} mm, share >= {best[1]:.0%}; shipped:")
    shipped = REACHES_MM.index(NEAR_METAL_MM)
    _groups(rows, shipped, NEAR_METAL_SHARE, args.large)
    if args.muscles:
        _muscle_table(rows, shipped, NEAR_METAL_SHARE, args.large)


if __name__ == "__main__":
    main()
