"""Rasterise the analytic anatomy on a CT grid: label map (ground truth) and HU image.

The patient comes from :mod:`seg.phantom.patient`; here each slice is rasterised: envelopes (skin,
subcutaneous fat, fascia), bones (cortex, marrow), muscles (nearest-surface partition with fat
planes), vessels, pelvic organs, post-operative changes, then blur and noise over the volume.
Rendering happens in a canonical frame (i → +x, j → +y, k → +z); feet-first series are the same
voxels flipped, so every position and slice order measures the same truth.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from seg import labels as L
from seg.header import SeriesHeader
from seg.phantom import anatomy as A
from seg.phantom import metal_ct
from seg.phantom.options import Phantom, PhantomOptions, Position
from seg.phantom.patient import SIDES, Item, Patient, build_items, draw_patient, implant_items
from seg.phantom.uids import derived_uid
from seg.volume import Volume

log = logging.getLogger(__name__)

FEMUR = L.LABEL_OF["femur"]
__all__ = ["Grid", "draw_patient", "make_phantom"]


class Grid:
    """Canonical voxel centres (mm, LPS): x[i], y[j], z[k], all increasing."""

    def __init__(self, opts: PhantomOptions, p: Patient, items: dict[str, list[Item]]):
        dx, dy, dz = opts.spacing_mm
        if opts.z_range_mm is not None:
            z_lo, z_hi = opts.z_range_mm
        else:
            z_lo, z_hi = A.Z_BOTTOM * p.s_z, A.Z_TOP * p.s_z
        nz = int(math.floor((z_hi - z_lo) / dz + 1e-6)) + 1
        self.z = z_lo + dz * np.arange(nz)
        # Field of view: the body envelope's extent over the scanned z range, plus a margin.
        zz = np.linspace(z_lo, z_hi, 60) / p.s_z
        half_w, front = 0.0, 0.0
        for it in items["pelvis"] + items["legs"]:
            for z in zz * p.s_z:
                q = A.interp_kf(it.kf, z)
                if q is None:
                    continue
                fat = p.fat_mm * float(np.interp(z / p.s_z, A.FAT_PROFILE[::-1, 0], A.FAT_PROFILE[::-1, 1]))
                half_w = max(half_w, q[0] + max(q[2], q[3]) + 1.3 * fat + 6)
                front = min(front, q[1] - max(q[2], q[3]) - 1.3 * fat - 6)
        half_w += 12
        front -= 12
        self.y_table = 100 * p.s_xy * p.bulk + 0.8 * p.fat_mm
        back = self.y_table + 32
        if opts.fov_mm is not None:
            fx, fy = opts.fov_mm
            half_w = fx / 2
            mid = (front + back) / 2
            front, back = mid - fy / 2, mid + fy / 2
        nx = int(math.ceil(2 * half_w / dx))
        ny = int(math.ceil((back - front) / dy))
        self.x = (np.arange(nx) - (nx - 1) / 2) * dx
        self.y = front + dy * np.arange(ny)
        self.spacing = (dx, dy, dz)

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.x), len(self.y), len(self.z)


def _crop(grid: Grid, side: int, p5: np.ndarray, margin: float,
          dy: float = 0.0) -> tuple[slice, slice] | None:
    """Index window that can hold the shape on its side of the body (shapes never cross x = 0)."""
    m, y, a, b, _ = p5
    y = y + dy
    r = max(a, b) + margin
    if side == 0:
        lo, hi = -(abs(m) + r), abs(m) + r
    elif side > 0:
        lo, hi = max(m - r, 0.0), m + r
    else:
        lo, hi = -(m + r), min(-(m - r), -1e-9)
    i0, i1 = np.searchsorted(grid.x, lo, "left"), np.searchsorted(grid.x, hi, "right")
    j0, j1 = np.searchsorted(grid.y, y - r, "left"), np.searchsorted(grid.y, y + r, "right")
    if i1 <= i0 or j1 <= j0:
        return None
    return slice(i0, i1), slice(j0, j1)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    """0 → 1 with zero slope at both ends (tapers, ramps)."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _field3(z: float, u: np.ndarray, v: np.ndarray, waves: np.ndarray) -> np.ndarray:
    """Sum of plane waves A·sin(ku·u + kv·v + kz·z + φ) on the grid u[i] × v[j].

    Separable (sin(a+b) = sin a cos b + cos a sin b), so a slice costs outer products, not sines.
    """
    out = np.zeros((u.size, v.size), np.float32)
    for amp, ku, kv, kz, ph, _ in waves:
        a = ku * u + kz * z + ph
        b = kv * v
        out += np.outer((amp * np.sin(a)).astype(np.float32), np.cos(b).astype(np.float32))
        out += np.outer((amp * np.cos(a)).astype(np.float32), np.sin(b).astype(np.float32))
    return out


_MARGIN_MM = 12.0  # crop margin around each shape's ellipse when rasterising a slice


@dataclass(frozen=True)
class _Appearance:
    """The image's random draws (texture, noise, fat waves), separate from the anatomy."""

    muscle_hu_off: np.ndarray  # per muscle
    tex_waves: np.ndarray
    noise_seed: int  # also seeds the implant's photon starvation (seg.phantom.metal_ct)
    fat_waves: np.ndarray  # subcutaneous fat thickness around the body


def _draw_appearance(rng: np.random.Generator, n_muscles: int) -> _Appearance:
    """Drawn after the anatomy and always in this order, so that a seed's voxels never move."""
    muscle_hu_off = rng.normal(0, 3.0, size=n_muscles)
    tex_waves = np.zeros((4, 6))
    for w in range(4):
        lam = rng.uniform(25, 60)
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        tex_waves[w, :5] = (1.0, *(2 * np.pi / lam * d), rng.uniform(0, 2 * np.pi))
    # Phantom 1.0 drew seven streaks here (angles, amplitudes, signs); the draws stay, unused, so
    # that the noise seed and the fat waves of every seed are what they were.
    rng.random(3 * 7)
    noise_seed = int(rng.integers(2**31))
    # Subcutaneous fat varies around the body (drawn last: earlier draws, hence the anatomy, stay put).
    fat_waves = np.zeros((2, 6))
    for w in range(2):
        lam, ang = rng.uniform(120, 300), rng.uniform(0, 2 * np.pi)
        fat_waves[w, :5] = (0.15, 2 * np.pi / lam * np.cos(ang), 2 * np.pi / lam * np.sin(ang),
                            rng.uniform(-0.01, 0.01), rng.uniform(0, 2 * np.pi))
    return _Appearance(muscle_hu_off=muscle_hu_off, tex_waves=tex_waves, noise_seed=noise_seed,
                       fat_waves=fat_waves)


class _Scene:
    """What every slice shares: options, patient, shapes, appearance, grid and in-plane coordinates."""

    def __init__(self, opts: PhantomOptions, p: Patient, items: dict[str, list[Item]], app: _Appearance,
                 grid: Grid):
        self.opts, self.p, self.items, self.app, self.grid = opts, p, items, app, grid
        self.plane = (len(grid.x), len(grid.y))
        self.xx, self.yy = (a.astype(np.float32) for a in np.meshgrid(grid.x, grid.y, indexing="ij"))
        self.mm = np.abs(self.xx)
        self.m1 = np.abs(grid.x)
        self.left = self.xx >= 0
        self.taper = _smoothstep((self.mm - 5.0) / 35.0)
        self.m_label = np.array([it.label for it in items["muscle"]], np.uint8)
        self.m_hu = (p.muscle_hu + app.muscle_hu_off).astype(np.float32)
        self.atrophy = _atrophy_table(opts)
        self.affected = _affected_side(opts)
        self.implant = implant_items(p) if (opts.postop and opts.implant_side) else []


class _Slice:
    """One z position: fat thickness, leg drop, the warped coordinates, and any shape's signed distance."""

    def __init__(self, sc: _Scene, z: float):
        p, grid = sc.p, sc.grid
        self.z, self.grid = z, grid
        self.fat_z = p.fat_mm * float(np.interp(z / p.s_z, A.FAT_PROFILE[::-1, 0], A.FAT_PROFILE[::-1, 1]))
        self.drop = _leg_drop(z, p, sc.items, grid, self.fat_z)
        self.md = sc.mm + sc.taper * _field3(z, sc.m1, grid.y, p.waves[0])
        self.yd = sc.yy - np.float32(self.drop) + sc.taper * _field3(z, sc.m1, grid.y, p.waves[1])

    def sd(self, it: Item, extra: float = 0.0) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Crop window and signed distance (mm, < 0 inside) of a shape here; None where it is absent."""
        p5 = A.interp_kf(it.kf, self.z)
        if p5 is None:
            return None
        c = _crop(self.grid, it.side, p5, _MARGIN_MM + extra, self.drop)
        if c is None:
            return None
        return c, A.ellipse_sd(self.md[c], self.yd[c], p5)


@dataclass(frozen=True)
class _Bones:
    """The nearest bone per pixel with its cortex and marrow, and the hip joint space."""

    sd: np.ndarray
    label: np.ndarray
    cortex_mm: np.ndarray
    marrow_hu: np.ndarray
    joint: np.ndarray
    mask: np.ndarray  # bone inside the body


@dataclass(frozen=True)
class _Tissue:
    """One slice's rasterised tissues: what the label map and the HU assignment both read."""

    body_sd: np.ndarray
    body: np.ndarray
    incomp: np.ndarray  # inside the muscle compartment
    bones: _Bones
    muscle: np.ndarray
    bidx: np.ndarray  # winning muscle index per pixel
    visc: np.ndarray  # viscera signed distance
    vessel: np.ndarray
    lab: np.ndarray


def make_phantom(opts: PhantomOptions) -> Phantom:
    """Render one phantom (CT in HU + labels) from its options; deterministic."""
    p, rng = draw_patient(opts)
    items = build_items(p, rng)
    app = _draw_appearance(rng, len(items["muscle"]))
    grid = Grid(opts, p, items)
    log.debug("phantom grid %s spacing %s", grid.shape, grid.spacing)
    labels, hu = _rasterise(_Scene(opts, p, items, app, grid))
    hu = _acquisition_blur(hu, grid.spacing, opts.slice_thickness_mm)
    if opts.noise:
        _add_noise(hu, p.noise_hu, app.noise_seed)
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    del hu
    side_voxels = _side_voxels(labels, grid)
    ct, labels, affine = _orient(ct, labels, grid, opts.position)
    header = _header(opts, p)
    return Phantom(ct=Volume(ct, affine.copy(), header), labels=Volume(labels, affine.copy(), header),
                   height_m=p.height_m, sex=p.sex, header=header, options=opts, side_voxels=side_voxels)


def _rasterise(sc: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """Label map (uint8) and noiseless HU (float32) in the canonical frame, slice by slice."""
    shape = sc.grid.shape
    labels = np.zeros(shape, np.uint8)
    hu = np.full(shape, -1000.0, np.float32)
    for k, z in enumerate(sc.grid.z):
        sl = _Slice(sc, z)
        t = _tissue(sc, sl)
        labels[:, :, k] = t.lab
        h = _slice_hu(sc, sl, t)
        if sc.implant:
            _implant(sc, sl, t, h, k)
        hu[:, :, k] = h
    return labels, hu


def _tissue(sc: _Scene, sl: _Slice) -> _Tissue:
    """Envelopes, bones, muscles (minus vessels and atrophy) and the slice's label map."""
    body_sd, incomp = _envelopes(sc, sl)
    body = body_sd < 0
    bones = _bones(sc, sl, body)
    best, second, bidx = _muscle_partition(sc, sl)
    # Muscles fill their compartment in the thigh (grow), less so among the pelvic organs.
    visc = _group_sd(sc, sl, "viscera", last_wins=True)
    grow = np.where(visc < 0, 0.0, sc.p.grow_mm)
    muscle = incomp & (best < grow) & ((second - best) >= sc.p.plane_mm) & ~bones.mask & (sc.mm >= 4.0)
    # Vessels (with a thin fat ring) are carved out of muscle.
    vsd = _group_sd(sc, sl, "vessel")
    vessel = (vsd < 0) & incomp & ~bones.mask
    muscle &= ~(vsd < 1.5)
    lab = np.where(bones.mask, bones.label, 0).astype(np.uint8)
    lab[muscle] = sc.m_label[bidx[muscle]]
    _atrophy(sc, lab, muscle, best)
    return _Tissue(body_sd=body_sd, body=body, incomp=incomp, bones=bones, muscle=muscle, bidx=bidx,
                   visc=visc, vessel=vessel, lab=lab)


def _envelopes(sc: _Scene, sl: _Slice) -> tuple[np.ndarray, np.ndarray]:
    """Body signed distance (skin at 0) and the muscle compartment mask (inside the deep fascia)."""
    grid = sc.grid
    comp = np.full(sc.plane, np.inf, np.float32)
    for it in sc.items["pelvis"] + sc.items["legs"]:
        r = sl.sd(it, extra=1.3 * sl.fat_z + 6.0)
        if r is not None:
            c, sd = r
            comp[c] = np.minimum(comp[c], sd)
    fat_map = sl.fat_z * (1.0 + _field3(sl.z, grid.x, grid.y, sc.app.fat_waves))
    body_sd = np.maximum(comp - fat_map, sc.yy - grid.y_table)
    comp = np.maximum(comp, sc.yy - (grid.y_table - 0.4 * sl.fat_z))
    return body_sd, comp < 0


def _bones(sc: _Scene, sl: _Slice, body: np.ndarray) -> _Bones:
    """Nearest bone per pixel (the acetabulum cupped around the femoral head), plus the joint space."""
    p, z = sc.p, sl.z
    bone_sd = np.full(sc.plane, np.inf, np.float32)
    bone_lab = np.zeros(sc.plane, np.uint8)
    bone_cortex = np.zeros(sc.plane, np.float32)
    bone_marrow = np.zeros(sc.plane, np.float32)
    head_m, head_y, head_z, head_r = (v * p.s_xy for v in A.FEMORAL_HEAD)
    head_z = A.FEMORAL_HEAD[2] * p.s_z
    for it in sc.items["bone"]:
        r = sl.sd(it)
        if r is None:
            continue
        c, sd = r
        if it.name == "acetabulum":
            rr = (head_r + 2.5) ** 2 - (z - head_z) ** 2
            if rr > 0:
                rj = math.sqrt(rr)
                hs = A.ellipse_sd(sl.md[c], sl.yd[c], np.array([head_m, head_y, rj, rj, 0.0]))
                sd = np.maximum(sd, -hs)
        upd = sd < bone_sd[c]
        bone_sd[c] = np.where(upd, sd, bone_sd[c])
        bone_lab[c] = np.where(upd, it.label, bone_lab[c])
        bone_cortex[c] = np.where(upd, it.cortex_mm, bone_cortex[c])
        bone_marrow[c] = np.where(upd, it.marrow_hu, bone_marrow[c])
    rr = head_r**2 - (z - head_z) ** 2
    joint = np.zeros(sc.plane, bool)  # hip joint space (cartilage, fluid) around the femoral heads
    if rr > 0:
        for side in SIDES:
            p5 = np.array([head_m, head_y, math.sqrt(rr), math.sqrt(rr), 0.0])
            c = _crop(sc.grid, side, p5, _MARGIN_MM, sl.drop)
            if c is None:
                continue
            sd = A.ellipse_sd(sl.md[c], sl.yd[c], p5)
            upd = sd < bone_sd[c]
            bone_sd[c] = np.where(upd, sd, bone_sd[c])
            bone_lab[c] = np.where(upd, FEMUR, bone_lab[c])
            bone_cortex[c] = np.where(upd, 1.5, bone_cortex[c])
            bone_marrow[c] = np.where(upd, 260.0, bone_marrow[c])
            joint[c] |= (sd >= 0) & (sd < 2.5)
    return _Bones(sd=bone_sd, label=bone_lab, cortex_mm=bone_cortex, marrow_hu=bone_marrow, joint=joint,
                  mask=(bone_sd < 0) & body)


def _muscle_partition(sc: _Scene, sl: _Slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest and second-nearest muscle distance and the nearest muscle's index (fat planes between)."""
    best = np.full(sc.plane, 1e9, np.float32)
    second = np.full(sc.plane, 1e9, np.float32)
    bidx = np.full(sc.plane, -1, np.int32)
    for it in sc.items["muscle"]:
        r = sl.sd(it)
        if r is None:
            continue
        c, sd = r
        b, s2 = best[c], second[c]
        better = sd < b
        second[c] = np.where(better, b, np.minimum(s2, sd))
        best[c] = np.where(better, sd, b)
        bidx[c] = np.where(better, it.index, bidx[c])
    return best, second, bidx


def _group_sd(sc: _Scene, sl: _Slice, key: str, last_wins: bool = False) -> np.ndarray:
    """Signed distance to a group of shapes: their minimum, or (last_wins) the last one drawn there."""
    out = np.full(sc.plane, np.inf, np.float32)
    for it in sc.items[key]:
        r = sl.sd(it)
        if r is not None:
            c, sd = r
            out[c] = sd if last_wins else np.minimum(out[c], sd)
    return out


def _atrophy(sc: _Scene, lab: np.ndarray, muscle: np.ndarray, best: np.ndarray) -> None:
    """Keep the innermost fraction f of each atrophied muscle's pixels on this slice (in place)."""
    for (label, side), f in sc.atrophy.items():
        sel = (lab == label) & (sc.left if side > 0 else ~sc.left)
        n = int(sel.sum())
        if n == 0 or f >= 1.0:
            continue
        keep = int(round(f * n))
        vals = best[sel]
        if keep == 0:
            thr = -np.inf
        else:
            thr = np.partition(vals, keep - 1)[keep - 1]
        gone = sel & (best > thr)
        lab[gone] = 0
        muscle &= ~gone


def _slice_hu(sc: _Scene, sl: _Slice, t: _Tissue) -> np.ndarray:
    """HU per tissue: couch, fat and skin, viscera and organs, vessels, joint, muscle, bone."""
    p, grid, bones = sc.p, sc.grid, t.bones
    h = np.full(sc.plane, -1000.0, np.float32)
    couch_top = grid.y_table + 3.0
    dy_c = sc.yy - couch_top
    h[(dy_c >= 0) & (dy_c < 3)] = 250.0
    h[(dy_c >= 3) & (dy_c < 20)] = -880.0
    h[(dy_c >= 20) & (dy_c < 23)] = 250.0
    tex = _field3(sl.z, grid.x, grid.y, sc.app.tex_waves)
    h[t.body] = p.fat_hu + 4.0 * tex[t.body]
    h[t.body & (t.body_sd > -p.skin_mm)] = 30.0
    vis = t.incomp & (t.visc < 0) & ~t.muscle & ~bones.mask
    if vis.any():
        tv = tex[vis]
        h[vis] = np.where(tv > 1.2, 35.0, np.where(tv < -3.3, -850.0, p.fat_hu + 10))
    _organs(sc, sl, t, h)
    h[t.vessel] = 42.0
    h[bones.joint & t.incomp & ~bones.mask & ~t.muscle] = 75.0
    h[t.muscle] = _muscle_hu(sc, t, tex)
    cort = bones.mask & (bones.sd > -bones.cortex_mm)
    h[bones.mask] = bones.marrow_hu[bones.mask] + 20.0 * tex[bones.mask]
    h[cort] = p.cortex_hu
    return h


def _organs(sc: _Scene, sl: _Slice, t: _Tissue, h: np.ndarray) -> None:
    """Bladder (fluid) and rectum (wall around gas) where no muscle or bone is, in place."""
    for key, val in (("bladder", 12.0), ("rectum", 30.0)):
        for it in sc.items[key]:
            r = sl.sd(it)
            if r is None:
                continue
            c, sd = r
            org = (sd < 0) & t.incomp[c] & ~t.bones.mask[c] & ~t.muscle[c]
            sub = h[c]
            sub[org] = val
            if key == "rectum":
                sub[org & (sd < -0.55 * max(1.0, float(-sd.min())))] = -900.0
            h[c] = sub


def _muscle_hu(sc: _Scene, t: _Tissue, tex: np.ndarray) -> np.ndarray:
    """Each muscle's HU with texture, mixed with fat on the affected side(s) when infiltrated."""
    mh = sc.m_hu[t.bidx[t.muscle]] + 2.0 * tex[t.muscle]
    if sc.opts.fat_infiltration > 0:
        lm = sc.left[t.muscle]
        aff = lm if sc.affected > 0 else (~lm if sc.affected < 0 else np.ones_like(mh, bool))
        w = np.clip(sc.opts.fat_infiltration * (1 + 0.5 * tex[t.muscle] / 2.0), 0, 1)
        mh = np.where(aff, (1 - w) * mh + w * sc.p.fat_hu, mh)
    return mh


def _implant(sc: _Scene, sl: _Slice, t: _Tissue, h: np.ndarray, k: int) -> None:
    """The implant in the operated femur at 3071 HU, plus its streaks over the body (in place).

    The streaks are the projection errors its metal causes (:mod:`seg.phantom.metal_ct`), seeded
    per slice ``k`` from the appearance's noise seed."""
    metal = _implant_metal(sc, sl, t)
    if metal is None:
        return
    h[metal] = 3071.0
    err = metal_ct.streak_error(h, metal, sc.grid.spacing[0], _slice_seed(sc.app, k))
    tissue = t.body & ~metal
    h[tissue] += err[tissue]


def _implant_metal(sc: _Scene, sl: _Slice, t: _Tissue) -> np.ndarray | None:
    """The implant's pixels on this slice (inside the operated femur), or None where it has none."""
    metal = np.zeros(sc.plane, bool)
    for it in sc.implant:
        r = sl.sd(it)
        if r is not None:
            c, sd = r
            metal[c] |= sd < 0
    metal &= (t.lab == FEMUR) & (sc.left if sc.opts.implant_side == "left" else ~sc.left)
    return metal if metal.any() else None


def _slice_seed(app: _Appearance, k: int) -> int:
    """Slice ``k``'s photon-starvation seed: its own, and fixed by the phantom's seed."""
    return (app.noise_seed + 7919 * k) % 2**32


def _acquisition_blur(hu: np.ndarray, spacing: tuple[float, float, float],
                      slice_thickness_mm: float | None) -> np.ndarray:
    """Slice-thickness blur along z and the in-plane resolution of a CT reconstruction."""
    dx, dy, dz = spacing
    thick = slice_thickness_mm or dz
    sig = (0.6 / dx, 0.6 / dy, 0.35 * thick / dz)  # a box profile of width `thick` ≈ σ 0.29·thick
    return ndimage.gaussian_filter(hu, sig, mode="nearest")


def _add_noise(hu: np.ndarray, noise_hu: float, seed: int) -> None:
    """In-plane correlated CT noise scaled to the patient's noise level (in place)."""
    nrng = np.random.default_rng(seed)
    noise = nrng.standard_normal(hu.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (0.7, 0.7, 0.0))
    noise *= np.float32(noise_hu / max(1e-6, float(noise[:, :, 0].std())))
    hu += noise


def _side_voxels(labels: np.ndarray, grid: Grid) -> dict[int, tuple[int, int]]:
    """(left, right) voxel count per structure label, counted in the canonical frame."""
    side_voxels = {}
    lmask = (grid.x >= 0)[:, None, None]
    for lab_v in range(1, L.NUM_CLASSES):
        sel = labels == lab_v
        nl = int(np.count_nonzero(sel & lmask))
        side_voxels[lab_v] = (nl, int(np.count_nonzero(sel)) - nl)
    return side_voxels


def _orient(ct: np.ndarray, labels: np.ndarray, grid: Grid,
            position: Position) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The volumes and their affine for the patient position (feet-first flips rows and slices)."""
    dx, dy, dz = grid.spacing
    affine = np.eye(4)
    affine[0, 0], affine[1, 1], affine[2, 2] = dx, dy, dz
    affine[:3, 3] = (grid.x[0], grid.y[0], grid.z[0])
    if position == "FFS":
        # Feet-first supine: rows run to the patient's right (-x), slices from head to feet.
        ct, labels = ct[::-1, :, ::-1].copy(), labels[::-1, :, ::-1].copy()
        affine[0, 0], affine[2, 2] = -dx, -dz
        affine[:3, 3] = (grid.x[-1], grid.y[0], grid.z[-1])
    return ct, labels, affine


def _leg_drop(z: float, p: Patient, items: dict[str, list[Item]], grid: Grid, fat_z: float) -> float:
    """How far (mm, posterior) the legs sink so that the thighs rest on the table, as in a real scan."""
    kf = items["legs"][0].kf
    q = A.interp_kf(kf, float(np.clip(z, kf[-1, 0], kf[0, 0])))
    assert q is not None
    posterior = q[1] + q[3] + fat_z
    ramp = float(_smoothstep(np.array((-z / p.s_z - 40.0) / 80.0)))
    return max(0.0, grid.y_table + 4.0 - posterior) * ramp


def _affected_side(opts: PhantomOptions) -> int:
    if opts.implant_side == "left":
        return 1
    if opts.implant_side == "right":
        return -1
    return 0


def _atrophy_table(opts: PhantomOptions) -> dict[tuple[int, int], float]:
    """(label, side) -> volume factor; the operated side only when an implant side is given."""
    if not opts.atrophy:
        return {}
    side = _affected_side(opts)
    sides = (side,) if side else SIDES
    return {(L.LABEL_OF[n], s): float(f) for n, f in opts.atrophy.items() for s in sides}


def _header(opts: PhantomOptions, p: Patient) -> SeriesHeader:
    """What the phantom's DICOM files will say of the patient, study and series."""
    key = opts.key()
    year = int(opts.study_date[:4])
    return SeriesHeader(
        patient_id=opts.patient_id or f"PHANTOM{opts.seed:04d}",
        patient_name=opts.patient_name or f"Phantom^Seed{opts.seed}",
        sex=p.sex,
        birth_date=f"{year - p.age:04d}0101",
        patient_age=f"{p.age:03d}Y",
        weight_kg=p.weight_kg,
        study_date=opts.study_date,
        study_time=opts.study_time,
        study_instance_uid=opts.study_uid or derived_uid("phantom-study", key),
        series_instance_uid=opts.series_uid or derived_uid("phantom-series", key),
        frame_of_reference_uid=derived_uid("phantom-for", key),
        modality="CT",
        patient_position=opts.position,
        accession_number=opts.accession_number or f"PH{opts.seed:04d}{opts.study_date}",
        study_id=f"{opts.seed % 100000}",
        issuer_of_patient_id="DICOMNODE-PHANTOM",
        size_m=p.height_m if opts.write_height else None,
    )
