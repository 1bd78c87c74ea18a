"""benchmarks/missed_muscle.py tells the network's own misses from the refinement's cuts, slice by slice."""

from __future__ import annotations

import numpy as np

from benchmarks.missed_muscle import _report, metal_slices, missed_muscle


def test_missed_muscle_is_the_networks_or_the_refinements_by_slice() -> None:
    muscle = np.zeros(256, bool)
    muscle[[3, 4]] = True  # two muscles; label 9 a bone
    truth = np.zeros((2, 2, 4), np.uint8)
    truth[..., :] = 3
    truth[0, 0, 0] = 9  # not a muscle: never counted
    network = truth.copy()
    network[1, 1, :] = 0  # the network misses one voxel a slice
    refined = network.copy()
    refined[0, 1, :] = 0  # the refinement cuts another
    refined[1, 0, 1] = 4  # a neighbour took it: labelled, so not missed
    refined[1, 1, 3] = 3  # claimed back by the refinement: not missed
    raw = np.zeros(truth.shape, np.float32)
    raw[0, 0, 2] = 3000.0  # metal in slice 2
    in_metal = metal_slices(raw)
    assert in_metal[:, :, 2].all() and not in_metal[:, :, [0, 1, 3]].any()
    background = np.full(truth.shape, 0.25)
    hu = np.full(truth.shape, -50.0)
    m = missed_muscle(muscle, truth, network, refined, in_metal, background, hu, voxel_cm3=0.5)
    assert (m.network_metal, m.network_other, m.cut_metal, m.cut_other) == (0.5, 1.0, 0.5, 1.5)
    assert m.network_background.tolist() == [0.25] and m.cut_hu.tolist() == [-50.0]
    text = _report([(1, m)])
    assert "in slices with metal: 29% of 4 cm³ missed" in text and "\n  all            0.5" in text
    assert max(map(len, text.splitlines())) <= 80
