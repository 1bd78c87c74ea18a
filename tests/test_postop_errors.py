"""benchmarks/postop_errors.py measures the operated side's atrophied muscles, and only that side."""

from __future__ import annotations

import numpy as np

from benchmarks.postop_errors import _errors, _side_mask
from seg.labels import LABEL_OF
from seg.phantom import PhantomOptions, make_phantom

OPTS = PhantomOptions(seed=4242, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=(-150.0, -90.0), postop=True,
                      implant_side="left", fat_infiltration=0.1,
                      atrophy={"vastus_lateralis": 0.7, "sartorius": 0.8})


def test_operated_side_errors_are_exact_and_one_sided() -> None:
    ph = make_phantom(OPTS)
    truth = np.asarray(ph.labels.array).astype(np.uint8)
    left = _side_mask(ph.ct, truth, "left")
    # the patient's left is +x in LPS: the left mask holds the voxels of larger x, and half the body
    x = ph.ct.affine[0, 0] * np.arange(truth.shape[0]) + ph.ct.affine[0, 3]
    assert left[np.argmax(x), 0, 0] and not left[np.argmin(x), 0, 0]
    assert 0.4 < (left & (truth > 0)).sum() / (truth > 0).sum() < 0.6

    exact = _errors(OPTS, ph.ct, truth, truth)
    assert [e.muscle for e in exact] == ["vastus_lateralis", "sartorius"]
    assert all(abs(e.error_pct) < 1e-9 and e.truth_cm3 > 1.0 for e in exact)

    vl = LABEL_OF["vastus_lateralis"]
    pred = truth.copy()
    pred[(pred == vl) & ~left] = 0  # the other side's muscle lost: the operated side is unchanged
    assert abs(_errors(OPTS, ph.ct, truth, pred)[0].error_pct) < 1e-9
    pred[(pred == vl) & left] = 0  # now the operated side's too
    e = _errors(OPTS, ph.ct, truth, pred)[0]
    assert e.error_pct == -100.0 and e.measured_cm3 == 0.0


def test_breakdown_tells_the_emptied_shell_from_a_neighbour_and_background() -> None:
    from benchmarks.postop_errors import _breakdown
    from seg.evaluate import preop_twin_options

    ph = make_phantom(OPTS)
    twin = make_phantom(preop_twin_options(OPTS))
    truth = np.asarray(ph.labels.array).astype(np.uint8)
    twin_truth = np.asarray(twin.labels.array).astype(np.uint8)
    twin_hu = np.asarray(twin.ct.array, np.float32)
    left = _side_mask(ph.ct, truth, "left")
    cm3 = float(np.prod(ph.ct.spacing_mm)) / 1000.0
    vl = LABEL_OF["vastus_lateralis"]

    def wrong(pred: np.ndarray):
        return _breakdown(4242, "vastus_lateralis", ph.ct, truth, pred, left, twin_hu, twin_truth)

    exact = wrong(truth)
    assert (exact.missed_cm3, exact.shell_cm3, exact.neighbour_cm3, exact.background_cm3) == (0, 0, 0, 0)

    shell = (twin_truth == vl) & (truth == 0)
    assert (shell & left).sum() > 50 and not (shell & ~left).any()  # atrophy on the operated side only
    pred = truth.copy()
    pred[shell] = vl  # the pre-operative outline: every emptied voxel claimed back
    w = wrong(pred)
    assert w.shell_cm3 == (shell & left).sum() * cm3 and w.neighbour_cm3 == w.background_cm3 == 0
    assert w.muscle_hu_share < 0.5  # the emptied shell is fat

    other = (truth > 0) & (truth != vl) & left
    pred = truth.copy()
    pred[other] = vl  # every other structure on the operated side
    pred[(truth == vl) & left] = 0  # and the muscle itself lost
    w = wrong(pred)
    assert w.neighbour_cm3 == other.sum() * cm3 and w.shell_cm3 == 0
    assert w.missed_cm3 == ((truth == vl) & left).sum() * cm3

    bg = (truth == 0) & (twin_truth == 0) & left & (np.asarray(ph.ct.array) > -500)  # in the body
    pred = truth.copy()
    pred[bg] = vl
    w = wrong(pred)
    assert w.background_cm3 == bg.sum() * cm3
    assert 0 < w.streak_lit_cm3 < w.background_cm3  # the implant's streaks light some of it


def test_each_ablation_variant_lacks_exactly_one_part_of_surgery() -> None:
    """--ablate's variants: without the implant no voxel holds metal but the operated leg keeps its
    atrophy; without the fat the atrophied volumes are unchanged and the muscle is denser; without
    the atrophy the muscle has its pre-operative volume."""
    from benchmarks.postop_errors import ablation_variants
    from seg.evaluate import side_volumes
    from seg.metal_proximity import METAL_HU

    variants = ablation_variants(OPTS)
    assert list(variants) == ["full", "no implant", "no fat", "no atrophy"] and variants["full"] is OPTS
    ph = {tag: make_phantom(v) for tag, v in variants.items()}
    vl = ("vastus_lateralis", "left")
    vol = {tag: side_volumes(p.labels.with_array(np.asarray(p.labels.array).astype(np.uint8)))[vl]
           for tag, p in ph.items()}
    hu = {tag: np.asarray(p.ct.array, np.float32) for tag, p in ph.items()}
    assert (hu["full"] > METAL_HU).any() and not (hu["no implant"] > METAL_HU).any()
    assert vol["no implant"] == vol["full"] == vol["no fat"] < 0.8 * vol["no atrophy"]
    muscle = np.asarray(ph["full"].labels.array) == LABEL_OF["vastus_lateralis"]
    assert hu["no fat"][muscle].mean() > hu["full"][muscle].mean() + 5.0
