"""Where a post-operative thigh's missed muscle comes from: the network, or the HU refinement's cut.

A muscle voxel of the truth that the package labels background was either never called muscle by the
network (and the refinement did not claim it back), or called muscle by the network and cut as fat
by the refinement's HU rule. Both are counted apart in the slices holding metal (where the residual
streaks change the CT number) and in the others, with the network's background probability and the
CT number (after the package's metal artefact reduction, as the refinement reads it) of each kind in
the slices with metal. The network runs once a case (:func:`seg.infer.network_pass`). The default
seeds (6000 on) are analysis seeds, neither trained on nor held out:

    .venv/bin/python benchmarks/missed_muscle.py --phantoms 24 --seed-start 6000
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from seg.metal_proximity import slices_with_metal


@dataclass(frozen=True)
class MissedMuscle:
    """One case's missed muscle (cm³), by source and by whether its slice holds metal."""

    network_metal: float  # the network's own miss, in a slice with metal
    network_other: float
    cut_metal: float  # the network called it muscle, the refinement cut it as fat
    cut_other: float
    network_background: np.ndarray  # background probabilities of the network's misses in metal slices
    cut_background: np.ndarray
    network_hu: np.ndarray  # their CT numbers as the refinement read them
    cut_hu: np.ndarray


def metal_slices(hu: np.ndarray) -> np.ndarray:
    """Mask of the voxels in a slice (axis 2, as :class:`seg.volume.Volume` orders them) holding
    metal, by the refinement's own test (:func:`seg.metal_proximity.slices_with_metal`)."""
    holds = slices_with_metal(hu)
    return np.broadcast_to(holds[None, None, :], hu.shape)


def missed_muscle(muscle: np.ndarray, truth: np.ndarray, network: np.ndarray, refined: np.ndarray,
                  in_metal_slice: np.ndarray, background: np.ndarray, hu: np.ndarray,
                  voxel_cm3: float) -> MissedMuscle:
    """One case's missed muscle by source. ``muscle``: a lookup, label -> analysed muscle;
    ``background``: the network's background probability (0..1) on the CT grid."""
    missed = muscle[truth] & (refined == 0)
    cut = missed & muscle[network]
    own = missed & ~cut
    return MissedMuscle(
        network_metal=float((own & in_metal_slice).sum() * voxel_cm3),
        network_other=float((own & ~in_metal_slice).sum() * voxel_cm3),
        cut_metal=float((cut & in_metal_slice).sum() * voxel_cm3),
        cut_other=float((cut & ~in_metal_slice).sum() * voxel_cm3),
        network_background=background[own & in_metal_slice], cut_background=background[cut & in_metal_slice],
        network_hu=hu[own & in_metal_slice], cut_hu=hu[cut & in_metal_slice],
    )


def _quartiles(values: np.ndarray, fmt: str) -> str:
    if not values.size:
        return "-"
    return " / ".join(format(v, fmt) for v in np.percentile(values, (25, 50, 75)))


_KINDS = ("network_metal", "network_other", "cut_metal", "cut_other")


def _row(first: object, cm3: list[float]) -> str:
    return f"{first!s:>5}" + "".join(f"{c:>15.1f}" for c in cm3)


def _report(cases: list[tuple[int, MissedMuscle]]) -> str:
    """The table of missed muscle, within 80 columns."""
    lines = ["missed muscle, cm³: the network's own, or cut by the refinement",
             f"{'seed':>5}" + "".join(f"{h:>15}" for h in ("network, metal", "network, other", "cut, metal",
                                                           "cut, other"))]
    for seed, m in cases:
        lines.append(_row(seed, [getattr(m, k) for k in _KINDS]))
    every = [m for _, m in cases]
    sums = [sum(getattr(m, k) for m in every) for k in _KINDS]
    lines.append(_row("all", sums))
    share = (sums[0] + sums[2]) / (sum(sums) or 1)
    lines.append(f"in slices with metal: {share:.0%} of {sum(sums):.0f} cm³ missed")
    for kind in ("network", "cut"):
        bg = np.concatenate([getattr(m, f"{kind}_background") for m in every])
        hu = np.concatenate([getattr(m, f"{kind}_hu") for m in every])
        lines.append(f"{kind}, metal slices, quartiles: background probability {_quartiles(bg, '.2f')},")
        lines.append(f"  HU {_quartiles(hu, '.0f')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model package folder (default: the shipped demo model)")
    ap.add_argument("--phantoms", type=int, default=24, help="cases in the plan (default: %(default)s)")
    ap.add_argument("--seed-start", type=int, default=6000, help="first seed (default: %(default)s)")
    args = ap.parse_args(argv)

    from seg import labels as L
    from seg.infer import network_pass
    from seg.model import load_model
    from seg.phantom import make_phantom
    from seg.train import phantom_plan

    model = load_model(args.model, device="cpu")
    muscle = np.zeros(256, bool)
    muscle[[L.by_name(n).label for n in L.ANALYSED_MUSCLES]] = True
    cases = []
    for opts in (o for o in phantom_plan(args.phantoms, args.seed_start) if o.postop):
        ph = make_phantom(opts)
        done = network_pass(ph.ct, model, background=True)
        network = np.asarray(done.labels(None).array)
        refined = np.asarray(done.labels(model.inference.hu_refinement).array)
        hu = np.asarray(done.ct.array)  # as the refinement read it
        cases.append((opts.seed, missed_muscle(
            muscle, np.asarray(ph.labels.array).astype(np.uint8), network, refined,
            metal_slices(hu), done.prediction.background / 255.0, hu,
            float(np.prod(ph.ct.spacing_mm)) / 1000.0)))
        print(f"seed {opts.seed}: done", flush=True)
    print(_report(cases))


if __name__ == "__main__":
    main()
