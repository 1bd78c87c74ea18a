"""Where a model errs on post-operative thighs: each atrophied muscle's volume error and a picture.

The atrophied muscles of post-operative phantoms (implant with streaks, atrophy, fat infiltration)
are segmented by the package (network and its HU refinement, as the node measures). Per muscle the
table gives the truth and measured volume on the operated side; the figure shows, for the worst
muscles, the axial slice where the prediction strays most: the CT, the truth and the prediction, the
muscle outlined in red. ``--breakdown`` says what the wrongly claimed voxels are (against the
pre-operative twin, the same patient without surgery on the same grid): the shell the atrophy
emptied, a neighbouring structure, or other background (and how much of that the implant's streaks
lit), with the share whose CT number lies in the muscle range, which no rule by CT number can take
back. ``--ablate`` segments each case again three times, each time without one of the three things
surgery adds (the implant with its streaks, the fat infiltration, the atrophy), so the table says
which of them the error comes with. The default seeds (6000 on, every 4th post-operative) are
neither training (1000-4257, 7000-7399) nor held-out (5000-5099) seeds, so looking at them tunes
nothing that is reported.

    .venv/bin/python benchmarks/postop_errors.py --pairs 2 --show 3 --out docs/img/postop_errors.png
    .venv/bin/python benchmarks/postop_errors.py --pairs 4 --show 0 --breakdown
    .venv/bin/python benchmarks/postop_errors.py --pairs 4 --show 0 --ablate
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from seg.hu_refine import MUSCLE_HU

if TYPE_CHECKING:
    from seg.phantom import PhantomOptions


@dataclass(frozen=True)
class MuscleError:
    """One atrophied muscle of one post-operative case, on its operated side."""

    seed: int
    muscle: str
    truth_cm3: float
    measured_cm3: float
    slice_index: int  # axial slice (CT grid) with the most wrongly labelled voxels of this muscle

    @property
    def error_pct(self) -> float:
        return (self.measured_cm3 / self.truth_cm3 - 1.0) * 100.0


@dataclass(frozen=True)
class WrongVoxels:
    """What one atrophied muscle's wrongly labelled voxels on the operated side are (cm³)."""

    seed: int
    muscle: str
    missed_cm3: float  # truth muscle labelled otherwise
    shell_cm3: float  # claimed where the atrophy emptied the muscle (the twin's muscle, now background)
    neighbour_cm3: float  # claimed from another structure
    background_cm3: float  # claimed from background that was background before surgery too
    streak_lit_cm3: float  # of that background: brighter than the twin by more than STREAK_HU
    muscle_hu_share: float  # of all claimed voxels: CT number within MUSCLE_HU


STREAK_HU = 60.0


def ablation_variants(opts: PhantomOptions) -> dict[str, PhantomOptions]:
    """The post-operative case and, for each thing surgery adds, the same case without it. Without
    the implant the atrophy and the fat stay on the same (``implant_side``) leg."""
    from dataclasses import replace

    return {"full": opts, "no implant": replace(opts, postop=False),
            "no fat": replace(opts, fat_infiltration=0.0), "no atrophy": replace(opts, atrophy={})}


def _print_ablation(rows: dict[tuple[int, str], dict[str, float]]) -> None:
    """Volume error (%) of each atrophied muscle in each variant, 80 columns wide, with medians."""
    tags = list(next(iter(rows.values())))
    print("\nvolume error on the operated side, %, without one part of surgery at a time")
    print(f"{'seed':>5} {'muscle':24}" + "".join(f" {t:>10}" for t in tags))
    for (seed, name), errs in rows.items():
        print(f"{seed:>5} {name.replace('_', ' '):24}" + "".join(f" {errs[t]:+10.1f}" for t in tags))
    med = {t: float(np.median([abs(e[t]) for e in rows.values()])) for t in tags}
    print(f"{'':>5} {'median abs':24}" + "".join(f" {med[t]:10.1f}" for t in tags))


def _breakdown(seed: int, name: str, ct, truth: np.ndarray, pred: np.ndarray, operated: np.ndarray,
               twin_hu: np.ndarray, twin_truth: np.ndarray) -> WrongVoxels:
    from seg.labels import LABEL_OF

    lab = LABEL_OF[name]
    cm3 = float(np.prod(ct.spacing_mm)) / 1000.0
    hu = np.asarray(ct.array)
    claimed = (pred == lab) & (truth != lab) & operated
    shell = claimed & (truth == 0) & (twin_truth == lab)
    background = claimed & (truth == 0) & (twin_truth != lab)
    # CT numbers of the few voxels asked about only, not the whole volume once per muscle
    lit = int((hu[background] - twin_hu[background] > STREAK_HU).sum())
    hu_claimed = hu[claimed]
    in_range = (hu_claimed >= MUSCLE_HU[0]) & (hu_claimed <= MUSCLE_HU[1])
    return WrongVoxels(seed, name, float(((truth == lab) & (pred != lab) & operated).sum() * cm3),
                       float(shell.sum() * cm3), float((claimed & (truth != 0)).sum() * cm3),
                       float(background.sum() * cm3), float(lit * cm3),
                       float(in_range.mean()) if in_range.size else 0.0)


def _side_mask(ct, truth: np.ndarray, side: str) -> np.ndarray:
    """Voxels on the patient's ``side`` of the labelled body's mean LPS x (+x is the patient's left)."""
    a = ct.affine
    i, j = np.meshgrid(np.arange(truth.shape[0]), np.arange(truth.shape[1]), indexing="ij")
    x = (a[0, 0] * i + a[0, 1] * j + a[0, 3])[:, :, None] + a[0, 2] * np.arange(truth.shape[2])
    mid = float(x[truth > 0].mean())
    return x > mid if side == "left" else x <= mid


def _errors(opts: PhantomOptions, ct, truth: np.ndarray, pred: np.ndarray) -> list[MuscleError]:
    from seg.evaluate import side_volumes
    from seg.labels import LABEL_OF

    side = opts.implant_side
    tv, pv = side_volumes(ct.with_array(truth)), side_volumes(ct.with_array(pred))
    operated = _side_mask(ct, truth, side)
    out = []
    for name in opts.atrophy:
        lab = LABEL_OF[name]
        wrong = (((pred == lab) != (truth == lab)) & operated).sum((0, 1))
        out.append(MuscleError(opts.seed, name, tv[(name, side)], pv.get((name, side), 0.0),
                               int(np.argmax(wrong))))
    return out


def _panel(axes, ct, truth: np.ndarray, pred: np.ndarray, operated: np.ndarray, e: MuscleError) -> None:
    """CT, truth and prediction around the muscle on its worst slice (the operated leg only)."""
    from seg.labels import LABEL_OF

    lab, k = LABEL_OF[e.muscle], e.slice_index
    on = ((truth[:, :, k] == lab) | (pred[:, :, k] == lab)) & operated[:, :, k]
    ii, jj = np.nonzero(on)
    pad = max(8, int(round(25.0 / ct.spacing_mm[0])))
    sl = (slice(max(ii.min() - pad, 0), ii.max() + pad), slice(max(jj.min() - pad, 0), jj.max() + pad))
    img = np.clip(np.asarray(ct.array[:, :, k], np.float32)[sl].T, -160, 240)
    titles = (f"seed {e.seed}: CT slice {k}", f"truth {e.truth_cm3:.0f} cm³",
              f"prediction {e.measured_cm3:.0f} cm³ ({e.error_pct:+.0f} %)")
    for a, labels, title in zip(axes, (None, truth, pred), titles, strict=True):
        a.imshow(img, cmap="gray", interpolation="nearest")
        if labels is not None:
            m = labels[:, :, k][sl].T
            a.imshow(np.ma.masked_equal(m % 20, 0), cmap="tab20", alpha=0.35, interpolation="nearest",
                     vmin=0, vmax=19)
            a.contour(m == lab, levels=[0.5], colors="red", linewidths=1.2)
        a.set_title(title, fontsize=9)
        a.set_xticks([])
        a.set_yticks([])
    axes[0].set_ylabel(e.muscle.replace("_", " "), fontsize=10)


def _print_breakdown(rows: list[WrongVoxels]) -> None:
    """The table of :class:`WrongVoxels`, 80 columns wide, with a total row."""
    print("\nwrongly labelled voxels on the operated side, cm³ (lit: background brighter")
    print(f"than the twin by > {STREAK_HU:g} HU; in range: claimed voxels at "
          f"{MUSCLE_HU[0]:g}…{MUSCLE_HU[1]:g} HU)")
    head = ("missed", "shell", "nbr", "bg", "lit")
    print(f"{'seed':>5} {'muscle':24}" + "".join(f" {h:>6}" for h in head) + f" {'in range':>8}")
    keys = ("missed_cm3", "shell_cm3", "neighbour_cm3", "background_cm3", "streak_lit_cm3")
    for w in rows:
        cells = "".join(f" {getattr(w, k):6.1f}" for k in keys)
        print(f"{w.seed:>5} {w.muscle.replace('_', ' '):24}{cells} {w.muscle_hu_share:8.0%}")
    claimed = [w.shell_cm3 + w.neighbour_cm3 + w.background_cm3 for w in rows]
    share = sum(w.muscle_hu_share * c for w, c in zip(rows, claimed, strict=True)) / max(sum(claimed), 1e-9)
    cells = "".join(f" {sum(getattr(w, k) for w in rows):6.1f}" for k in keys)
    print(f"{'all':>5} {'':24}{cells} {share:8.0%}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model package (default: the shipped demo)")
    ap.add_argument("--seed-start", type=int, default=6000, help="first seed of the plan (post-op every 4th)")
    ap.add_argument("--pairs", type=int, default=2, help="post-operative cases to segment")
    ap.add_argument("--show", type=int, default=3, help="worst muscles to picture")
    ap.add_argument("--network-only", action="store_true", help="leave out the HU refinement")
    ap.add_argument("--out", default=None, help="PNG to write (none: the table only)")
    ap.add_argument("--breakdown", action="store_true",
                    help="what the wrongly claimed voxels are (renders each case's pre-operative twin)")
    ap.add_argument("--ablate", action="store_true",
                    help="segment each case again without its implant, its fat, its atrophy (one at a time)")
    args = ap.parse_args(argv)

    from seg.evaluate import preop_twin_options
    from seg.infer import segment
    from seg.model import load_model
    from seg.phantom import make_phantom
    from seg.train import phantom_plan

    model = load_model(args.model, device="cpu")
    post = [o for o in phantom_plan(4 * args.pairs, args.seed_start) if o.postop]
    cases, errors, wrong, ablation = {}, [], [], {}
    for n, opts in enumerate(post, start=1):
        t0 = time.time()
        ph = make_phantom(opts)
        truth = np.asarray(ph.labels.array).astype(np.uint8)
        pred = np.asarray(segment(ph.ct, model, hu_refinement=not args.network_only).array)
        cases[opts.seed] = (ph.ct, truth, pred, _side_mask(ph.ct, truth, opts.implant_side))
        errors += _errors(opts, ph.ct, truth, pred)
        if args.breakdown:
            twin = make_phantom(preop_twin_options(opts))
            twin_hu = np.asarray(twin.ct.array, np.float32)
            twin_truth = np.asarray(twin.labels.array).astype(np.uint8)
            wrong += [_breakdown(opts.seed, name, ph.ct, truth, pred, cases[opts.seed][3], twin_hu,
                                 twin_truth) for name in opts.atrophy]
        if args.ablate:
            for tag, variant in ablation_variants(opts).items():
                if tag != "full":
                    v = make_phantom(variant)
                    v_truth = np.asarray(v.labels.array).astype(np.uint8)
                    v_pred = np.asarray(segment(v.ct, model, hu_refinement=not args.network_only).array)
                else:
                    v, v_truth, v_pred = ph, truth, pred
                for e in _errors(opts, v.ct, v_truth, v_pred):
                    ablation.setdefault((e.seed, e.muscle), {})[tag] = e.error_pct
        # A case takes minutes (--ablate: three more segmentations): say so on stderr as each ends.
        print(f"case {n} of {len(post)} (seed {opts.seed}) done in {time.time() - t0:.0f} s",
              file=sys.stderr, flush=True)
    print(f"{model.info.name} {model.info.version}"
          f"{' (network only)' if args.network_only else ''}: atrophied muscles, operated side")
    print(f"{'seed':>5} {'muscle':24} {'truth cm³':>10} {'measured':>9} {'error':>7}")
    for e in errors:
        print(f"{e.seed:>5} {e.muscle.replace('_', ' '):24} {e.truth_cm3:10.1f} {e.measured_cm3:9.1f} "
              f"{e.error_pct:+6.1f}%")
    err = np.abs([e.error_pct for e in errors])
    print(f"median abs error {np.median(err):.1f} %, worst {err.max():.1f} %, "
          f"{int((err <= 5).sum())} of {len(err)} within 5 %")
    if wrong:
        _print_breakdown(wrong)
    if ablation:
        _print_ablation(ablation)
    if args.out and args.show > 0:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        worst = sorted(errors, key=lambda e: -abs(e.error_pct))[: args.show]
        fig, axes = plt.subplots(len(worst), 3, figsize=(10, 3.3 * len(worst)), squeeze=False)
        for row, e in zip(axes, worst, strict=True):
            _panel(row, *cases[e.seed], e)
        fig.suptitle(f"{model.info.name} {model.info.version}: the worst atrophied muscles "
                     "of post-operative phantoms", fontsize=11)
        fig.tight_layout()
        fig.savefig(args.out, dpi=90)
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
