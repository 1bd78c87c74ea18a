"""benchmarks/postop_errors.py measures the operated side's atrophied muscles, and only that side."""

from __future__ import annotations

import numpy as np

from benchmarks.postop_errors import _errors, _side_mask
from seg.labels import LABEL_OF
from seg.phantom import PhantomOptions, make_phantom

OPTS = dict(seed=4242, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=(-150.0, -90.0), postop=True,
            implant_side="left", fat_infiltration=0.1, atrophy={"vastus_lateralis": 0.7, "sartorius": 0.8})


def test_operated_side_errors_are_exact_and_one_sided() -> None:
    ph = make_phantom(PhantomOptions(**OPTS))
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
