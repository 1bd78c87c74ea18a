"""What a perfect metal artefact reduction would be worth: the package on streak-free twins.

The post-operative error is where the implant's streaks cross the muscles (docs/models.md). Whether
a better reduction is worth building, or only a better network helps, is measured here: each
post-operative case of the plan is rendered twice, as it is and with the phantom's streak error
switched off (the same phantom, implant, noise and atrophy; what a perfect reduction would give),
and segmented by the package with and without its own reduction. Against the pre-operative twin
(segmented once), the table gives the post-operative cases' mean muscle Dice and the atrophied
muscles' pre->post loss error. The default seeds (6000 on) are analysis seeds, neither trained on
nor held out:

    .venv/bin/python benchmarks/streak_oracle.py --phantoms 24 --seed-start 6000
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from seg.model import ModelPackage
    from seg.phantom import Phantom, PhantomOptions

TARGET_PP = 5.0  # the bound on a loss error (docs/models.md targets)


@contextmanager
def streaks_off() -> Iterator[None]:
    """Phantoms made inside render their implants without the streak error (zero everywhere).

    Why a patch: the phantom has no option for it, and must not get one that training or evaluation
    could switch on; :func:`seg.phantom.metal_ct.streak_error` is what its renderer calls per slice
    (tests/test_streak_oracle.py fails when it no longer does)."""
    from seg.phantom import metal_ct

    real = metal_ct.streak_error

    def no_error(hu: np.ndarray, metal: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        return np.zeros(hu.shape, np.float32)

    metal_ct.streak_error = no_error
    try:
        yield
    finally:
        metal_ct.streak_error = real


def streak_free(opts: PhantomOptions) -> Phantom:
    """The phantom of ``opts`` without its implant's streaks (implant, noise, labels unchanged)."""
    from seg.train import plan_phantom

    with streaks_off():
        return plan_phantom(opts, None)


def without_reduction(model: ModelPackage) -> ModelPackage:
    """``model`` with its metal artefact reduction (and learned streak correction) switched off
    (the network and all else its own)."""
    pre = model.preprocess.model_copy(update={"metal_artefact_reduction": "none"})
    meta = model.meta.model_copy(update={"preprocessing": pre, "streak_correction": None})
    return replace(model, meta=meta, streak_net=None)


@dataclass
class Variant:
    """One way of seeing the post-operative cases: their Dice and atrophied muscles' loss errors."""

    name: str
    dice: list[float]
    errors_pp: list[float]

    def row(self) -> str:
        e = [abs(v) for v in self.errors_pp]
        within = sum(v <= TARGET_PP for v in e)
        return (f"{self.name:<30}{np.mean(self.dice):>8.4f}{statistics.median(e):>8.2f}{max(e):>8.1f}"
                f"{within:>6}/{len(e)}")


def _truth(ph: Phantom):  # noqa: ANN202
    """The phantom's labels as a uint8 volume on its CT grid (as :mod:`seg.evaluate` reads them)."""
    return ph.ct.with_array(np.asarray(ph.labels.array).astype(np.uint8))


HEADER = f"{'post-operative CT, reduction':<30}{'Dice':>8}{'median':>8}{'worst':>8}{'within 5':>9}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model package folder (default: the shipped demo model)")
    ap.add_argument("--phantoms", type=int, default=24, help="cases in the plan (default: %(default)s)")
    ap.add_argument("--seed-start", type=int, default=6000, help="first seed (default: %(default)s)")
    ap.add_argument("--streak-net", default=None, help="safetensors of scripts/train_streak_net.py: also "
                    "the rendered CT after LI and the learned streak correction (seg.streak_net)")
    args = ap.parse_args(argv)

    from seg.evaluate import atrophy_loss_records, evaluate_case, preop_twin_options, side_volumes
    from seg.infer import segment
    from seg.model import load_model
    from seg.train import phantom_plan, plan_phantom

    model = load_model(args.model, device="cpu")
    plain = without_reduction(model)
    own = model.preprocess.metal_artefact_reduction
    variants = {key: Variant(name, [], []) for key, name in (
        ("rendered", f"as rendered, {own}"), ("free", "streak-free, none (perfect)"),
        ("free+own", f"streak-free, {own}"), ("rendered+none", "as rendered, none"))}
    learned = None
    if args.streak_net:
        from seg.streak_net import load_streak_net

        learned = load_streak_net(args.streak_net)
        variants["learned"] = Variant("as rendered, li + learned", [], [])
    for o in phantom_plan(args.phantoms, args.seed_start):
        if not (o.postop and o.atrophy and o.implant_side):
            continue
        twin = plan_phantom(preop_twin_options(o), None)
        pre = (side_volumes(segment(twin.ct, model)), side_volumes(_truth(twin)))
        post, free = plan_phantom(o, None), streak_free(o)
        runs = {"rendered": (post, post.ct, model), "free": (free, free.ct, plain),
                "free+own": (free, free.ct, model), "rendered+none": (post, post.ct, plain)}
        if learned is not None:
            from seg.mar import reduce_metal_artefacts
            from seg.streak_net import correct_streaks

            runs["learned"] = (post, correct_streaks(reduce_metal_artefacts(post.ct), learned), plain)
        for key, (ph, ct, package) in runs.items():
            truth = _truth(ph)
            labels = segment(ct, package)
            records = atrophy_loss_records(o, pre, (side_volumes(labels), side_volumes(truth)))
            variants[key].errors_pp += [r.error_pp for r in records]
            variants[key].dice.append(evaluate_case(labels, truth, hd95=False).mean_dice_muscles or 0.0)
        print(f"seed {o.seed}: done", flush=True)
    print(f"atrophied muscles' loss error (pp) against the pre-operative twins, {model.info.name} "
          f"{model.info.version}")
    print(HEADER)
    for v in variants.values():
        print(v.row())


if __name__ == "__main__":
    main()
