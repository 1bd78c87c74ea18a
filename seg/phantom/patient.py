"""Who the phantom is: one patient drawn from the seed, and its structures placed in patient space.

Sex, height, build, fat, per-muscle shape, elastic deformation and HU levels all come from one
random stream with a fixed number of draws, so options that do not change the patient (spacing,
position, post-op changes) never shift it: a post-op phantom is the same person as its pre-op one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seg import labels as L
from seg.phantom import anatomy as A
from seg.phantom.options import PhantomOptions

SIDES = (1, -1)  # +1 = patient's left (+x in LPS), -1 = right


@dataclass
class Patient:
    """The random draw behind one seed: who the phantom is."""

    sex: str
    height_m: float
    age: int
    s_z: float
    s_xy: float
    bulk: float
    pelvis_w: float
    fat_mm: float
    weight_kg: float
    muscle_hu: float
    fat_hu: float
    cortex_hu: float
    noise_hu: float
    plane_mm: float
    grow_mm: float
    skin_mm: float
    waves: np.ndarray  # (2, n, 6): per axis (m, y) n waves: amp, kx, ky, kz, phase, unused


@dataclass
class Item:
    """A jittered, scaled structure ready to rasterise on one side (or the midline)."""

    name: str
    label: int
    kind: str
    kf: np.ndarray
    side: int  # +1 left, -1 right, 0 midline
    index: int = -1  # muscle competition index
    cortex_mm: float = 0.0
    marrow_hu: float = 0.0


def draw_patient(opts: PhantomOptions) -> tuple[Patient, np.random.Generator]:
    """Draw the patient; always the same number of draws so options never shift the stream."""
    rng = np.random.default_rng([opts.seed, 20241124])
    sex = "F" if rng.random() < 0.5 else "M"
    h_f, h_m = rng.uniform(1.50, 1.70), rng.uniform(1.62, 1.85)
    if opts.sex is not None:
        sex = opts.sex
    height = round(h_f if sex == "F" else h_m, 2)
    if opts.height_m is not None:
        height = float(opts.height_m)
    s_z = height / 1.70
    frame = rng.uniform(0.95, 1.05)
    bulk = rng.uniform(0.92, 1.04) if sex == "M" else rng.uniform(0.85, 0.98)
    pelvis_w = (1.05 if sex == "F" else 1.0) * rng.uniform(0.97, 1.03)
    fat = rng.uniform(12, 28) if sex == "F" else rng.uniform(6, 18)
    age = int(rng.integers(62, 91))
    bmi = 18.5 + 0.45 * fat + 3.0 * (bulk - 0.9)
    waves = np.zeros((2, 3, 6))
    for ax in range(2):
        for w in range(3):
            lam = rng.uniform(90, 220)
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            waves[ax, w, :5] = (rng.uniform(1.5, 3.5), *(2 * np.pi / lam * d), rng.uniform(0, 2 * np.pi))
    p = Patient(
        sex=sex, height_m=height, age=age, s_z=s_z, s_xy=s_z * frame, bulk=bulk, pelvis_w=pelvis_w,
        fat_mm=fat, weight_kg=round(bmi * height**2, 1), muscle_hu=rng.uniform(42, 55),
        fat_hu=rng.uniform(-112, -92), cortex_hu=rng.uniform(1150, 1600), noise_hu=rng.uniform(9, 16),
        plane_mm=rng.uniform(1.0, 1.8), grow_mm=rng.uniform(5.0, 9.0),
        skin_mm=rng.uniform(1.5, 2.5), waves=waves,
    )
    return p, rng


def _jitter(kf: np.ndarray, rng: np.random.Generator, amount: float = 1.0) -> np.ndarray:
    """Per-structure shape variation: shifted ends, offset centre, scaled radii, tilt."""
    k = kf.copy()
    z0, z1 = k[0, 0], k[-1, 0]
    dz_top, dz_bot = rng.normal(0, 5, 2) * amount
    span = z0 - z1
    k[:, 0] = z1 + dz_bot + (k[:, 0] - z1) * (span + dz_top - dz_bot) / span
    k[:, 1] += rng.normal(0, 2.5) * amount
    k[:, 2] += rng.normal(0, 2.5) * amount
    k[:, 3] *= 1 + rng.normal(0, 0.08) * amount
    k[:, 4] *= 1 + rng.normal(0, 0.08) * amount
    k[:, 5] += rng.normal(0, 4) * amount
    return k


def _scale(kf: np.ndarray, p: Patient, soft: bool) -> np.ndarray:
    """Patient size: z by height, in-plane by frame; soft tissue also by muscle bulk about the femur."""
    k = kf.copy()
    if soft:
        ref = np.array([A.interp_axis(z) for z in k[:, 0]])
        k[:, 1] = ref[:, 0] + (k[:, 1] - ref[:, 0]) * p.bulk
        k[:, 2] = ref[:, 1] + (k[:, 2] - ref[:, 1]) * p.bulk
        k[:, 3:5] *= p.bulk
    k[:, 0] *= p.s_z
    k[:, 1:5] *= p.s_xy
    return k


def build_items(p: Patient, rng: np.random.Generator) -> dict[str, list[Item]]:
    """All structures for this patient, jittered (same draws every time) and scaled."""
    out: dict[str, list[Item]] = {"muscle": [], "bone": [], "vessel": []}
    idx = 0
    for table, labelled in ((A.MUSCLES, True), (A.DISTRACTOR_MUSCLES, False)):
        for name, rows in table.items():
            base = _jitter(A._kf(rows), rng)
            base[:, 3:5] *= A.RADIUS_SCALE.get(name, 1.0)
            for side in SIDES:
                k = base.copy()
                k[:, 3:5] *= 1 + rng.normal(0, 0.03)  # left/right asymmetry
                out["muscle"].append(Item(name, L.LABEL_OF[name] if labelled else 0, A.MUSCLE,
                                          _scale(k, p, True), side, idx))
                idx += 1
    for name, lab, rows, cortex, marrow in A.BONES:
        base = _jitter(A._kf(rows), rng, 0.3)  # bones: small variation, identical on both sides
        for side in SIDES:
            out["bone"].append(Item(name, L.LABEL_OF[lab] if lab else 0, A.BONE, _scale(base, p, False), side,
                                    cortex_mm=cortex, marrow_hu=marrow))
    for name, rows, cortex, marrow in A.MIDLINE_BONES:
        out["bone"].append(Item(name, 0, A.BONE, _scale(_jitter(A._kf(rows), rng, 0.3), p, False), 0,
                                cortex_mm=cortex, marrow_hu=marrow))
    for name, rows in A.VESSELS.items():
        base = _jitter(A._kf(rows), rng, 0.5)
        for side in SIDES:
            k = _scale(base, p, True)
            k[:, 3:5] = base[:, 3:5] * p.s_xy
            out["vessel"].append(Item(name, 0, A.VESSEL, k, side))
    pel = _scale(A._kf(A.PELVIS_COMPARTMENT), p, True)
    pel[:, 3] *= p.pelvis_w
    out["pelvis"] = [Item("pelvis", 0, "envelope", pel, 0)]
    out["legs"] = [Item("leg", 0, "envelope", _scale(A._kf(A.LEG_COMPARTMENT), p, True), s) for s in SIDES]
    out["viscera"] = [Item("viscera", 0, "envelope", _scale(A._kf(A.VISCERA), p, False), 0)]
    out["bladder"] = [Item("bladder", 0, "envelope", _scale(A._kf(A.BLADDER), p, False), 0)]
    out["rectum"] = [Item("rectum", 0, "envelope", _scale(A._kf(A.RECTUM), p, False), 0)]
    return out


def implant_items(p: Patient) -> list[Item]:
    """Cephalomedullary nail + lag screw (both sides defined; masked to the operated side later)."""
    nail = A._kf([(12, 126, 6, 8, 8), (-60, 122, 7, 7, 7), (-90, 119, 6, 5.5, 5.5), (-240, 111, 5, 5.5, 5.5),
                  (-250, 110, 5, 3, 3)])
    screw = A._kf([(-2, 92, -8, 7.5, 5), (-45, 140, 4, 7.5, 5)])
    out = []
    for kf in (nail, screw):
        k = kf.copy()
        k[:, 0] *= p.s_z
        k[:, 1:5] *= p.s_xy
        for side in SIDES:
            out.append(Item("implant", 0, "metal", k, side))
    return out
