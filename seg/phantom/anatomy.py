"""The phantom's anatomy as analytic shapes in patient space, independent of any voxel grid.

Every structure is a stack of ellipses whose centre, radii and tilt vary smoothly with z
(keyframes, linearly interpolated). Coordinates are for one side of the body in millimetres for
a 1.70 m adult: ``z`` along the body axis with 0 at the femoral head centre (+ = head),
``m`` = distance from the mid-sagittal plane (+ = lateral), ``y`` = LPS y (+ = posterior).
Sided structures are mirrored onto both legs (x = ±m); midline structures have m = 0.
Keyframe rows: (z, m, y, a, b, tilt_deg) with a along the tilted m-axis and b along y.
Rasterising these shapes on any grid gives the same anatomy, so every spacing and patient position
measures the same patient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Kinds decide how a structure competes for voxels and how it is rendered.
MUSCLE = "muscle"  # competes with other muscles (nearest-surface partition, fat planes between)
BONE = "bone"  # wins over soft tissue; cortex + marrow
VESSEL = "vessel"  # blood, carved out of everything soft, ringed by fat


@dataclass
class Shape:
    """One structure (or one component of it) on one side of the body."""

    name: str
    label: int  # 0 = unlabelled (distractor)
    kind: str
    kf: np.ndarray  # (n, 6) keyframes: z, m, y, a, b, tilt_deg; z strictly decreasing
    midline: bool = False
    cortex_mm: float = 0.0  # bones: cortical thickness
    marrow_hu: float = 0.0  # bones: HU inside the cortex
    minus_sphere: tuple[float, float, float, float] | None = None  # (m, y, z, r) carved out (joint)


def _kf(rows: list[tuple[float, ...]]) -> np.ndarray:
    a = np.array([r if len(r) == 6 else (*r, 0.0) for r in rows], dtype=float)
    if np.any(np.diff(a[:, 0]) >= 0):
        raise ValueError("keyframes must be ordered from head to feet")
    return a


# Reference axis (femoral head / shaft) that muscle bulk scales about: (z, m, y).
REF_AXIS = np.array([
    (300, 60, 10), (30, 60, 10), (0, 88, -10), (-30, 100, 0), (-60, 122, 8), (-200, 112, 5),
    (-330, 103, 8), (-400, 95, 18), (-600, 95, 15)], dtype=float)

# Femoral head: sphere (m, y, z, r).
FEMORAL_HEAD = (88.0, -10.0, 0.0, 23.0)

# Key z levels (mm, 1.70 m adult): whole phantom from L4 to below the knee.
Z_TOP = 140.0
Z_BOTTOM = -465.0

# name -> keyframes; labelled muscles in the paper's order.
MUSCLES: dict[str, list[tuple[float, ...]]] = {
    "sartorius": [(55, 122, -62, 6, 5), (30, 122, -66, 10, 7, -20), (0, 122, -68, 12, 8, -20),
                  (-60, 112, -64, 14, 8, -25), (-120, 90, -55, 14, 9, -40), (-200, 68, -30, 13, 9, 60),
                  (-280, 58, -5, 13, 10, 70), (-350, 58, 20, 12, 10, 80), (-410, 62, 35, 10, 9),
                  (-445, 70, 30, 5, 5)],
    "rectus_femoris": [(25, 108, -45, 6, 5), (0, 110, -50, 10, 8), (-60, 112, -50, 15, 12),
                       (-150, 108, -45, 19, 14), (-250, 105, -40, 17, 12), (-320, 102, -40, 12, 8),
                       (-365, 100, -40, 5, 4)],
    "vastus_lateralis": [(-5, 142, 5, 8, 12), (-30, 150, 5, 12, 25, -10), (-80, 152, 2, 15, 32, -10),
                         (-200, 142, -2, 17, 32, -15), (-300, 136, 0, 15, 26, -10), (-360, 128, 0, 11, 18),
                         (-390, 122, -5, 5, 8)],
    "vastus_intermedius": [(-55, 125, -12, 8, 5), (-90, 122, -16, 18, 10), (-200, 114, -16, 22, 12),
                           (-300, 105, -16, 20, 10), (-365, 100, -14, 8, 5)],
    "vastus_medialis": [(-90, 105, -5, 6, 6), (-150, 95, -18, 14, 14), (-250, 85, -20, 19, 19),
                        (-330, 78, -12, 23, 22), (-375, 80, -5, 16, 15), (-398, 84, -2, 6, 6)],
    "adductor_longus": [(-30, 28, -55, 6, 5, 30), (-50, 40, -50, 14, 10, 30), (-100, 58, -38, 17, 12, 35),
                        (-170, 75, -18, 15, 11, 40), (-230, 90, 5, 10, 8, 40), (-260, 100, 18, 4, 4)],
    "adductor_brevis": [(-45, 35, -32, 8, 6, 30), (-70, 50, -22, 16, 11, 30), (-110, 70, -8, 17, 12, 35),
                        (-150, 92, 10, 12, 9, 35), (-175, 105, 20, 4, 4)],
    "adductor_magnus": [(-55, 55, 25, 10, 8), (-80, 60, 25, 20, 18), (-140, 72, 28, 26, 24),
                        (-220, 78, 28, 26, 24, 10), (-300, 78, 25, 20, 16), (-350, 75, 22, 12, 10),
                        (-385, 75, 20, 5, 5)],
    "gracilis": [(-45, 22, -35, 5, 8), (-80, 30, -20, 8, 14), (-150, 38, 0, 8, 16), (-250, 42, 10, 8, 14),
                 (-350, 50, 30, 7, 9), (-420, 58, 40, 5, 5), (-445, 68, 28, 3, 3)],
    "pectineus": [(-20, 45, -52, 10, 6, 20), (-40, 55, -45, 16, 10, 25), (-65, 75, -30, 14, 10, 35),
                  (-85, 95, -8, 6, 6)],
    "semitendinosus": [(-62, 68, 50, 6, 6), (-100, 80, 55, 12, 10), (-200, 95, 58, 15, 11),
                       (-300, 88, 58, 12, 9), (-370, 78, 55, 6, 6), (-445, 68, 32, 3, 3)],
    "semimembranosus": [(-65, 62, 42, 5, 5), (-110, 75, 45, 8, 7), (-200, 88, 48, 14, 12),
                        (-300, 86, 45, 17, 15), (-370, 82, 42, 14, 12), (-410, 80, 38, 6, 6)],
    "biceps_femoris": [(-65, 72, 45, 6, 6), (-110, 95, 50, 12, 10), (-200, 122, 45, 16, 14),
                       (-300, 130, 40, 17, 15), (-370, 132, 35, 13, 12), (-425, 133, 30, 5, 5)],
    "gluteus_maximus": [(110, 55, 85, 10, 6, -30), (80, 70, 88, 30, 12, -25), (40, 95, 90, 45, 20, -25),
                        (0, 115, 75, 50, 24, -30), (-50, 120, 65, 42, 22, -30), (-100, 135, 45, 25, 15, -60),
                        (-150, 145, 30, 6, 5)],
    "gluteus_medius": [(135, 129, 21, 20, 9, -40), (100, 116, 20, 40, 14, -44), (60, 106, 23, 38, 16, -50),
                       (30, 128, 15, 28, 18, -55), (0, 148, 12, 14, 22), (-20, 147, 8, 7, 9)],
    "gluteus_minimus": [(95, 107, 13, 22, 6, -44), (60, 98, 17, 26, 8, -50), (30, 115, 0, 20, 10, -60),
                        (0, 126, -8, 8, 18), (-15, 130, -5, 5, 6)],
    "tensor_fasciae_latae": [(45, 132, -52, 6, 5), (20, 138, -48, 10, 8, 50), (-20, 148, -40, 13, 9, 55),
                             (-60, 155, -28, 11, 8, 60), (-100, 160, -18, 5, 4)],
    "piriformis": [(72, 30, 55, 8, 8), (55, 48, 55, 22, 12, -10), (35, 80, 45, 30, 10, -20),
                   (15, 110, 25, 22, 8, -30), (3, 128, 15, 6, 5)],
    "obturator_internus": [(25, 40, 15, 5, 10, 70), (0, 40, 10, 7, 22, 70), (-25, 40, 5, 7, 20, 70),
                           (-45, 42, 0, 5, 8)],
    "obturator_externus": [(-20, 70, 5, 10, 6, 20), (-35, 70, 0, 22, 9, 20), (-50, 65, -5, 18, 9, 20),
                           (-65, 60, -10, 8, 6)],
    "quadratus_femoris": [(-42, 95, 35, 10, 5, -15), (-55, 98, 35, 24, 8, -15), (-70, 98, 35, 24, 8, -15),
                          (-82, 98, 33, 10, 5)],
    "iliacus": [(130, 103, -7, 15, 6, -41), (100, 90, -7, 34, 10, -44), (60, 78, 0, 30, 11, -50),
                (30, 80, -35, 20, 12, -30), (15, 85, -40, 12, 10)],
    "iliopsoas": [(18, 80, -40, 10, 9), (0, 85, -45, 20, 13), (-30, 95, -38, 18, 13, 20),
                  (-60, 102, -15, 14, 12, 40), (-80, 106, 8, 6, 6)],
    "psoas": [(200, 33, 10, 18, 16), (130, 38, 10, 22, 18), (90, 48, -5, 20, 16), (50, 62, -25, 15, 13),
              (18, 75, -35, 8, 8)],
    "abdominal_oblique": [(200, 138, -15, 12, 55, -10), (120, 138, -20, 12, 50, -15),
                          (90, 128, -55, 10, 35, -45), (60, 110, -75, 8, 25, -60), (35, 95, -85, 5, 12, -70)],
    "rectus_abdominis": [(200, 35, -92, 28, 9), (90, 32, -98, 26, 9), (30, 24, -100, 18, 9),
                         (-15, 16, -90, 10, 7), (-30, 12, -80, 5, 5)],
    "multifidus": [(200, 20, 60, 13, 18), (110, 22, 65, 14, 18), (70, 20, 80, 13, 14), (40, 16, 85, 9, 9),
                   (25, 12, 85, 4, 4)],
}

# Cross-section scale per muscle, calibrated so the 21 analysed muscles' shares of their total come
# close to Kim et al. 2024, Table 1 (pre-operative composition), after the partition has filled space.
RADIUS_SCALE: dict[str, float] = {
    "vastus_lateralis": 0.68, "vastus_intermedius": 1.55, "vastus_medialis": 1.05, "rectus_femoris": 0.65,
    "sartorius": 0.6, "gracilis": 0.38, "gluteus_maximus": 1.55, "gluteus_medius": 0.9,
    "gluteus_minimus": 1.3,
    "biceps_femoris": 0.7, "semimembranosus": 1.2, "semitendinosus": 1.1, "quadratus_femoris": 2.2,
    "tensor_fasciae_latae": 0.55, "piriformis": 0.6, "obturator_internus": 0.65, "adductor_brevis": 1.1,
}

# Unlabelled muscles: they look like muscle on CT but belong to no class (the model must learn that).
DISTRACTOR_MUSCLES: dict[str, list[tuple[float, ...]]] = {
    "erector_spinae": [(200, 55, 62, 20, 16), (110, 50, 68, 16, 14), (80, 40, 78, 8, 8)],
    "quadratus_lumborum": [(200, 70, 30, 14, 12), (125, 72, 35, 10, 8)],
    "gastrocnemius_medial": [(-345, 80, 45, 6, 6), (-380, 80, 52, 16, 14), (-420, 82, 55, 20, 16),
                             (-520, 80, 58, 24, 18)],
    "gastrocnemius_lateral": [(-350, 118, 45, 5, 5), (-385, 116, 50, 12, 11), (-420, 115, 55, 15, 13),
                              (-520, 112, 55, 18, 15)],
    "soleus_popliteus": [(-420, 100, 35, 10, 6), (-520, 100, 38, 25, 10)],
    "tibialis_anterior": [(-430, 118, -15, 6, 6), (-520, 120, -15, 12, 14)],
}

# Bones: name -> list of (label name or "", keyframes, cortex mm, marrow HU).
BONES: list[tuple[str, str, list[tuple[float, ...]], float, float]] = [
    ("femur_neck", "femur", [(8, 100, -8, 15, 14), (-10, 110, -4, 20, 15), (-30, 120, 2, 20, 16),
                             (-45, 122, 5, 17, 16)], 2.0, 230.0),
    ("femur_greater_trochanter", "femur", [(8, 128, 10, 8, 10), (-5, 130, 8, 16, 20), (-30, 128, 6, 20, 22),
                                           (-55, 124, 6, 17, 18)], 1.5, 210.0),
    ("femur_lesser_trochanter", "femur", [(-55, 110, 12, 5, 5), (-68, 108, 16, 11, 9, 30),
                                          (-80, 112, 14, 5, 5)], 1.5, 220.0),
    ("femur_shaft", "femur", [(-50, 123, 7, 17, 17), (-90, 120, 6, 15, 15), (-200, 112, 5, 14, 14),
                              (-320, 103, 8, 15, 14), (-345, 101, 10, 12, 11)], 5.0, -20.0),
    ("femur_condyles", "femur", [(-315, 103, 8, 12, 11), (-340, 101, 10, 19, 16), (-360, 100, 12, 24, 20),
                                 (-390, 96, 18, 36, 27), (-405, 95, 18, 38, 26), (-415, 95, 18, 30, 20),
                                 (-420, 95, 18, 10, 8)], 1.5, 180.0),
    ("iliac_wing", "iliac_bone", [(140, 118, 5, 25, 7, -40), (120, 108, 5, 50, 8, -42),
                                  (90, 98, 5, 60, 7, -45), (60, 90, 10, 48, 9, -50),
                                  (35, 85, 15, 35, 16, -50), (20, 82, 12, 30, 25, -40)], 1.5, 300.0),
    ("acetabulum", "iliac_bone", [(28, 80, -2, 20, 22), (15, 72, -5, 26, 29), (0, 70, -8, 27, 31),
                                  (-15, 70, -5, 25, 28), (-28, 68, 0, 16, 18)], 2.0, 280.0),
    ("pubis", "iliac_bone", [(-5, 55, -45, 20, 10, 25), (-20, 40, -55, 30, 10, 20),
                             (-35, 25, -55, 18, 10, 10), (-45, 18, -50, 8, 8)], 1.5, 260.0),
    ("ischium", "iliac_bone", [(-10, 62, 30, 14, 20), (-35, 62, 32, 16, 22), (-55, 60, 38, 18, 18),
                               (-70, 55, 40, 16, 14, 20), (-80, 40, 25, 22, 8, 50), (-88, 30, 10, 10, 5)],
     1.5, 260.0),
    ("tibia", "", [(-422, 96, 15, 8, 6), (-428, 96, 15, 36, 26), (-450, 97, 12, 32, 24),
                   (-520, 97, 10, 22, 20)], 2.0, 150.0),
    ("fibula", "", [(-430, 132, 30, 5, 5), (-440, 133, 30, 8, 8), (-520, 130, 30, 7, 7)], 2.0, 200.0),
    ("patella", "", [(-350, 100, -44, 6, 4), (-365, 100, -46, 20, 9), (-395, 98, -46, 20, 9),
                     (-405, 98, -44, 6, 4)], 1.5, 300.0),
]

MIDLINE_BONES: list[tuple[str, list[tuple[float, ...]], float, float]] = [
    ("lumbar_vertebrae", [(200, 0, 18, 26, 20), (95, 0, 22, 26, 20)], 2.0, 200.0),
    ("spinous_processes", [(200, 0, 68, 5, 16), (95, 0, 70, 5, 14)], 2.0, 250.0),
    ("sacrum", [(95, 0, 35, 45, 20), (70, 0, 45, 48, 18), (40, 0, 60, 35, 14), (10, 0, 70, 20, 10),
                (-15, 0, 72, 8, 6)], 1.5, 220.0),
]

VESSELS: dict[str, list[tuple[float, ...]]] = {
    "femoral_artery": [(200, 40, 0, 6, 6), (90, 55, -20, 5, 5), (40, 70, -58, 5, 5), (0, 72, -65, 5, 5),
                       (-60, 80, -58, 4, 4), (-150, 78, -32, 4, 4), (-250, 78, -2, 4, 4),
                       (-330, 90, 28, 4, 4), (-400, 96, 38, 4, 4), (-520, 96, 40, 4, 4)],
    "femoral_vein": [(200, 28, 5, 7, 7), (90, 45, -15, 6, 6), (40, 58, -58, 6, 6), (0, 60, -62, 6, 6),
                     (-60, 68, -55, 5, 5), (-150, 70, -25, 5, 5), (-250, 72, 5, 5, 5),
                     (-330, 84, 34, 5, 5), (-400, 90, 44, 5, 5), (-520, 90, 46, 5, 5)],
    "profunda_femoris": [(-55, 88, -42, 3, 3), (-150, 100, -5, 3, 3), (-250, 100, 15, 3, 3)],
}

# Soft-tissue envelopes: the muscle compartment (inside the deep fascia) of the pelvis (midline)
# and of each leg. Subcutaneous fat and skin lie outside it.
PELVIS_COMPARTMENT = [(200, 0, 5, 140, 95), (60, 0, 0, 148, 100), (0, 0, 0, 162, 105), (-45, 0, 5, 152, 95),
                      (-75, 0, 10, 95, 65), (-95, 0, 10, 30, 30)]
LEG_COMPARTMENT = [(-10, 100, 5, 82, 80), (-100, 100, 8, 76, 72), (-250, 97, 8, 66, 62),
                   (-380, 95, 12, 56, 52), (-520, 95, 12, 46, 44)]
# Abdominal/pelvic contents (bowel, fat) and organs; unlabelled.
VISCERA = [(200, 0, -20, 110, 62), (60, 0, -30, 95, 52), (0, 0, -30, 52, 40), (-35, 0, -35, 28, 24),
           (-45, 0, -35, 5, 5)]
BLADDER = [(10, 0, -60, 5, 5), (0, 0, -58, 40, 28), (-30, 0, -55, 35, 24), (-42, 0, -50, 10, 8)]
RECTUM = [(40, 0, 50, 15, 12), (-40, 0, 40, 12, 10), (-60, 0, 30, 6, 6)]
# Relative subcutaneous fat thickness along z.
FAT_PROFILE = np.array([(200, 1.5), (0, 1.35), (-100, 1.1), (-300, 0.8), (-420, 0.55), (-600, 0.45)], float)


def interp_kf(kf: np.ndarray, z: float) -> np.ndarray | None:
    """(m, y, a, b, tilt) at level z, or None outside the structure's z range."""
    zs = kf[:, 0]
    if z > zs[0] or z < zs[-1]:
        return None
    zr, rows = zs[::-1], kf[::-1]
    return np.array([np.interp(z, zr, rows[:, c]) for c in range(1, 6)])


def interp_axis(z: float) -> tuple[float, float]:
    zr = REF_AXIS[::-1]
    return float(np.interp(z, zr[:, 0], zr[:, 1])), float(np.interp(z, zr[:, 0], zr[:, 2]))


def ellipse_sd(m: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) of points to a tilted ellipse.

    First-order (value / gradient) near the boundary, capped by the radial distance so the centre
    stays finite; good enough for partitions, fat planes and cortices of a few millimetres.
    """
    cm, cy, a, b, tilt = (float(v) for v in p)  # Python floats keep float32 grids in float32
    t = math.radians(tilt)
    c, s = math.cos(t), math.sin(t)
    du = m - cm
    dv = y - cy
    u = du * c + dv * s
    v = -du * s + dv * c
    ua = u / a
    vb = v / b
    d2 = ua * ua + vb * vb
    g = 2.0 * np.sqrt((ua / a) ** 2 + (vb / b) ** 2) + 1e-6
    sd_grad = (d2 - 1.0) / g
    d = np.sqrt(d2) + 1e-6
    rho = np.sqrt(u * u + v * v)
    sd_rad = (d - 1.0) * rho / d
    sd_rad = np.where(rho < 1e-6, -min(a, b), sd_rad)
    inside = d2 < 1.0
    return np.where(inside, np.maximum(sd_grad, sd_rad), np.minimum(sd_grad, sd_rad))
