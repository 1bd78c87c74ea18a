"""Display colours (structures.csv → SEG RecommendedDisplayCIELabValue): structures that touch differ
clearly. Adjacency comes from a small phantom label map; distance is CIE76 ΔE in CIELab (D65)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from seg.labels import by_name, structures
from seg.phantom import PhantomOptions, make_phantom

MIN_DELTA_E_TOUCHING = 30.0  # clearly different side by side (the old 21 for semimembranosus/ilium was not)
MIN_DELTA_E_ANY = 20.0  # still told apart in a legend
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb: tuple[int, int, int]) -> np.ndarray:
    """CIELab (D65) of an 8-bit sRGB colour: linearise, to XYZ, then the CIE f(t) transform."""
    c = np.asarray(rgb, dtype=float) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = _SRGB_TO_XYZ @ linear / _D65_WHITE
    eps = (6 / 29) ** 3
    f = np.where(t > eps, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def delta_e(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(srgb_to_lab(a) - srgb_to_lab(b)))


def touching_labels(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different non-background labels that are face neighbours somewhere."""
    pairs: set[tuple[int, int]] = set()
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        p, q = a[:-1].ravel(), a[1:].ravel()
        m = (p != q) & (p > 0) & (q > 0)
        pairs |= {(min(u, v), max(u, v)) for u, v in zip(p[m].tolist(), q[m].tolist(), strict=True)}
    return pairs


@pytest.fixture(scope="module")
def touching() -> set[tuple[int, int]]:
    ph = make_phantom(PhantomOptions(seed=1, spacing_mm=(3, 3, 3), z_range_mm=(-120, 60)))
    return touching_labels(np.asarray(ph.labels.array))


def test_lab_conversion_reference_values() -> None:
    assert srgb_to_lab((255, 255, 255)) == pytest.approx([100.0, 0.0, 0.0], abs=0.01)
    assert srgb_to_lab((0, 0, 0)) == pytest.approx([0.0, 0.0, 0.0], abs=0.01)
    assert srgb_to_lab((255, 0, 0)) == pytest.approx([53.24, 80.09, 67.20], abs=0.05)
    assert srgb_to_lab((128, 128, 128)) == pytest.approx([53.59, 0.0, 0.0], abs=0.05)


def test_touching_structures_differ_clearly(touching) -> None:
    s = structures()
    assert len(touching) > 50  # the phantom really has neighbours (muscles, bones)
    named = {(by_name("gluteus_maximus").label, by_name("femur").label),
             (by_name("semimembranosus").label, by_name("iliac_bone").label)}
    assert named <= touching  # the pairs a radiologist found too alike are neighbours
    close = sorted((round(delta_e(s[a].rgb, s[b].rgb), 1), s[a].name, s[b].name) for a, b in touching
                   if delta_e(s[a].rgb, s[b].rgb) < MIN_DELTA_E_TOUCHING)
    assert close == []


def test_every_structure_has_a_distinct_colour() -> None:
    s = structures()[1:]
    pairs = itertools.combinations(s, 2)
    close = [(x.name, y.name) for x, y in pairs if delta_e(x.rgb, y.rgb) < MIN_DELTA_E_ANY]
    assert close == []
