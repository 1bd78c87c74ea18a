"""Metal streak strength: phantom 1.0's drawn streaks against phantom 1.1's projection errors.

Why: phantom 1.1 makes its implant's streaks by projection (seg/phantom/metal_ct.py); it must not
become easier than 1.0 did. For every metal slice of the held-out post-operative phantoms
(``phantom_plan(24, 5000)``: seeds 5003 … 5023) it compares the HU error each version adds to the
body outside the metal, 10-50 mm and 50-100 mm in-plane from the nearest metal pixel: mean |error|,
2nd and 98th percentile, per seed and on average.

    PYTHONPATH=$PWD nice -n 5 .venv/bin/python benchmarks/metal_streak_strength.py
    ... --mu-metal 0.5 --k-harden 0.05 --i0 1e5      # try another calibration
    ... --picture docs/img/phantom_streaks.png         # one slice of two seeds, 1.0 vs 1.1
    ... --timing [--threads 1]                         # render time with and without the streaks
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from seg.phantom import PhantomOptions, make_phantom, metal_ct
from seg.phantom import render as R
from seg.train import phantom_plan

RINGS_MM = ((10.0, 50.0), (50.0, 100.0))


@dataclass(frozen=True)
class MetalSlice:
    """One slice with metal: its HU before streaks, the masks, and both versions' streak fields."""

    k: int
    hu: np.ndarray
    metal: np.ndarray
    body: np.ndarray  # body outside the metal: where the streaks are added
    dist_mm: np.ndarray  # in-plane distance to the nearest metal pixel
    drawn: np.ndarray  # phantom 1.0
    physical: np.ndarray  # phantom 1.1


@dataclass(frozen=True)
class RingStats:
    """The streak field's strength in one ring of distances."""

    mean_abs: float
    p2: float
    p98: float


# --- phantom 1.0's drawn streaks (reference only: copied from seg/phantom/render.py at 1.0) -----


def _streak_draws_1_0(opts: PhantomOptions) -> tuple[np.ndarray, np.ndarray]:
    """The seven streak angles and amplitudes phantom 1.0 drew for these options."""
    p, rng = R.draw_patient(opts)
    items = R.build_items(p, rng)
    rng.normal(0, 3.0, size=len(items["muscle"]))
    for _ in range(4):
        rng.uniform(25, 60)
        rng.normal(size=3)
        rng.uniform(0, 2 * np.pi)
    angles = rng.uniform(0, np.pi, 7)
    amp = rng.uniform(80, 350, 7) * np.where(rng.random(7) < 0.5, -1, 1)
    return angles, amp


def _drawn_1_0(sc: R._Scene, z: float, metal: np.ndarray, angles: np.ndarray,
               amp: np.ndarray) -> np.ndarray:
    """Phantom 1.0's ``_metal_streaks`` field: Gaussian lines through the metal's centroid."""
    xx, yy, sp = sc.xx, sc.yy, sc.grid.spacing
    cx, cy = xx[metal].mean(), yy[metal].mean()
    rad = np.hypot(xx - cx, yy - cy)
    amp_scale = min(2.0, math.sqrt(metal.sum() * sp[0] * sp[1] / 80.0))
    st = np.zeros(sc.plane, np.float32)
    for th, a in zip(angles + 0.03 * math.sin(z / 17.0), amp, strict=True):
        perp = np.abs(-math.sin(th) * (xx - cx) + math.cos(th) * (yy - cy))
        st += a * amp_scale * np.exp(-(perp / 3.5) ** 2) * np.exp(-rad / 90.0)
    return st


# ------------------------------------------------------------------------------------------------


def metal_slices(opts: PhantomOptions, scan: metal_ct.MetalScan) -> Iterator[MetalSlice]:
    """Every slice with metal of a post-operative phantom, rendered as make_phantom renders it."""
    p, rng = R.draw_patient(opts)
    items = R.build_items(p, rng)
    app = R._draw_appearance(rng, len(items["muscle"]))
    grid = R.Grid(opts, p, items)
    sc = R._Scene(opts, p, items, app, grid)
    angles, amp = _streak_draws_1_0(opts)
    for k, z in enumerate(grid.z):
        sl = R._Slice(sc, z)
        t = R._tissue(sc, sl)
        metal = R._implant_metal(sc, sl, t)
        if metal is None:
            continue
        hu = R._slice_hu(sc, sl, t)
        hu[metal] = 3071.0
        err = metal_ct.streak_error(hu, metal, grid.spacing[0], R._slice_seed(app, k), scan)
        dist = ndimage.distance_transform_edt(~metal, sampling=grid.spacing[:2])
        yield MetalSlice(k=k, hu=hu, metal=metal, body=t.body & ~metal, dist_mm=dist,
                         drawn=_drawn_1_0(sc, z, metal, angles, amp), physical=err)


def ring_stats(values: np.ndarray) -> RingStats:
    p2, p98 = np.percentile(values, [2, 98])
    return RingStats(mean_abs=float(np.abs(values).mean()), p2=float(p2), p98=float(p98))


def strength(opts: PhantomOptions, scan: metal_ct.MetalScan) -> dict[str, list[RingStats]]:
    """Per version ("drawn", "physical"): its RingStats in each of RINGS_MM, over all metal slices."""
    vals: dict[str, list[list[np.ndarray]]] = {v: [[] for _ in RINGS_MM] for v in ("drawn", "physical")}
    for s in metal_slices(opts, scan):
        for i, (lo, hi) in enumerate(RINGS_MM):
            ring = s.body & (s.dist_mm >= lo) & (s.dist_mm < hi)
            vals["drawn"][i].append(s.drawn[ring])
            vals["physical"][i].append(s.physical[ring])
    return {v: [ring_stats(np.concatenate(r)) for r in rings] for v, rings in vals.items()}


def _row(label: str, ring: str, d: RingStats, p: RingStats) -> str:
    return (f"{label:>5}  {ring:>6}  {d.mean_abs:6.1f} {d.p2:6.0f} {d.p98:6.0f}"
            f"   {p.mean_abs:6.1f} {p.p2:6.0f} {p.p98:6.0f}")


def table(cases: list[PhantomOptions], scan: metal_ct.MetalScan) -> None:
    print(f"streak field (HU) on body outside the metal; 1.1: mu_metal {scan.mu_metal}/mm, "
          f"k {scan.k_harden},")
    print(f"I0 {scan.i0:.0e}, {scan.n_angles} angles, work grid {scan.work_mm} mm")
    print(f"{'seed':>5}  {'mm':>6}  {'1.0 drawn: |e|':>14} {'p2':>6} {'p98':>6}"
          f"   {'1.1 proj: |e|':>13} {'p2':>6} {'p98':>6}")
    per_ring: list[list[tuple[RingStats, RingStats]]] = [[] for _ in RINGS_MM]
    for opts in cases:
        st = strength(opts, scan)
        for i, (lo, hi) in enumerate(RINGS_MM):
            d, p = st["drawn"][i], st["physical"][i]
            per_ring[i].append((d, p))
            print(_row(str(opts.seed), f"{lo:.0f}-{hi:.0f}", d, p), flush=True)
    for i, (lo, hi) in enumerate(RINGS_MM):
        mean = [RingStats(*(float(np.mean([getattr(pair[j], f) for pair in per_ring[i]]))
                            for f in ("mean_abs", "p2", "p98"))) for j in (0, 1)]
        print(_row("mean", f"{lo:.0f}-{hi:.0f}", *mean))


def picture(cases: list[PhantomOptions], scan: metal_ct.MetalScan, out: Path) -> None:
    """One metal slice (the middle one) of each case: 1.0's drawn streaks beside 1.1's, noiseless."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(cases), 2, figsize=(8, 3.4 * len(cases)), squeeze=False)
    for row, opts in zip(axes, cases, strict=True):
        slices = list(metal_slices(opts, scan))
        s = slices[len(slices) // 2]
        for ax, (name, field) in zip(row, (("1.0 drawn", s.drawn), ("1.1 projection", s.physical)),
                                     strict=True):
            img = np.where(s.body, s.hu + field, s.hu)
            ax.imshow(img.T, cmap="gray", vmin=-200, vmax=300)
            ax.set_title(f"seed {opts.seed} slice {s.k}: {name}", fontsize=9)
            ax.axis("off")
    fig.suptitle("Phantom metal streaks, -200..300 HU (noiseless, before the blur)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def timing(cases: list[PhantomOptions], scan: metal_ct.MetalScan) -> None:
    """make_phantom's time per case with the streaks, and with them switched off (zero error)."""
    real = metal_ct.streak_error
    print(f"{'seed':>5}  {'spacing':>7}  {'shape':>15}  {'no streaks':>10}  {'1.1':>6}  {'added':>6}")
    for opts in cases:
        secs = []
        for fn in (lambda hu, *_: np.zeros(hu.shape, np.float32), lambda *a: real(*a, scan)):
            metal_ct.streak_error = fn
            t0 = time.perf_counter()
            ph = make_phantom(opts)
            secs.append(time.perf_counter() - t0)
        metal_ct.streak_error = real
        shape = "x".join(str(n) for n in ph.ct.shape)
        print(f"{opts.seed:>5}  {opts.spacing_mm[0]:>5.1f}mm  {shape:>15}  {secs[0]:>9.1f}s"
              f"  {secs[1]:>5.1f}s  {secs[1] - secs[0]:>5.1f}s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="*", help="post-operative plan seeds (default: all six)")
    ap.add_argument("--mu-metal", type=float, default=metal_ct.SCANNER.mu_metal)
    ap.add_argument("--k-harden", type=float, default=metal_ct.SCANNER.k_harden)
    ap.add_argument("--i0", type=float, default=metal_ct.SCANNER.i0)
    ap.add_argument("--angles", type=int, default=metal_ct.SCANNER.n_angles)
    ap.add_argument("--work-mm", type=float, default=metal_ct.SCANNER.work_mm)
    ap.add_argument("--picture", type=Path, help="write the 1.0 vs 1.1 picture here instead")
    ap.add_argument("--timing", action="store_true", help="time make_phantom at 1.0, 1.5 and 3 mm instead")
    ap.add_argument("--threads", type=int, help="torch threads (the phantom workers of training use 1)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    scan = replace(metal_ct.SCANNER, mu_metal=a.mu_metal, k_harden=a.k_harden, i0=a.i0,
                   n_angles=a.angles, work_mm=a.work_mm)
    post = {o.seed: o for o in phantom_plan(24, 5000) if o.postop}
    if a.timing:
        timing([post[s] for s in (a.seeds or (5019, 5011, 5015))], scan)  # 1.0, 1.5, 3.0 mm
    elif a.picture:
        picture([post[s] for s in (a.seeds or (5003, 5019))], scan, a.picture)
    else:
        table([post[s] for s in (a.seeds or sorted(post))], scan)


if __name__ == "__main__":
    main()
