"""benchmarks/streak_oracle.py: the streak-free twin differs from the phantom by its streaks alone."""

from __future__ import annotations

import numpy as np

from benchmarks.streak_oracle import HEADER, Variant, streak_free, without_reduction
from seg.metal_proximity import METAL_HU, slices_with_metal
from seg.model import load_model
from seg.phantom import PhantomOptions, make_phantom

POST = PhantomOptions(seed=4242, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-160.0, -40.0), postop=True,
                      implant_side="left", atrophy={"vastus_lateralis": 0.7})


def test_the_streak_free_twin_lacks_only_the_streaks() -> None:
    """Same labels, implant and noise; the CT differs only in the slices with metal, there by the
    streaks' size (the renderer still calls the patched function: else no difference)."""
    post, free = make_phantom(POST), streak_free(POST)
    assert np.array_equal(np.asarray(post.labels.array), np.asarray(free.labels.array))
    hu, hu0 = np.asarray(post.ct.array, np.float32), np.asarray(free.ct.array, np.float32)
    metal = slices_with_metal(hu)
    assert metal.any() and np.array_equal(metal, slices_with_metal(hu0))
    assert np.array_equal(hu[:, :, ~metal], hu0[:, :, ~metal])  # slices without metal: the same
    implant, implant0 = hu > METAL_HU, hu0 > METAL_HU  # the same but at its blurred edge
    assert (implant & implant0).sum() >= 0.9 * (implant | implant0).sum()
    streak = (hu - hu0)[:, :, metal]
    assert np.sqrt((streak ** 2).mean()) > 10.0  # tens of HU RMS over the metal slices
    again = make_phantom(POST)  # the patch is undone
    assert np.array_equal(np.asarray(again.ct.array), np.asarray(post.ct.array))


def test_without_reduction_changes_only_the_reduction() -> None:
    model = load_model(None, device="cpu")
    plain = without_reduction(model)
    own = model.preprocess.metal_artefact_reduction
    assert own != "none" and plain.preprocess.metal_artefact_reduction == "none"
    assert plain.streak_net is None and plain.meta.streak_correction is None
    assert plain.network is model.network and plain.inference == model.inference
    assert plain.preprocess.model_copy(update={"metal_artefact_reduction": own}) == model.preprocess


def test_the_table_fits_80_columns() -> None:
    row = Variant("streak-free, none (perfect)", [0.97, 0.98], [0.4, -19.9, 5.0, 5.1]).row()
    assert row.endswith("2/4") and "19.9" in row
    assert max(len(HEADER), len(row)) <= 80
