"""The paper's preprocessing as MONAI transforms, and its exact inverse back onto the CT grid.

Forward (CT grid → model grid): orientation to RAS, resampling to the model spacing, HU window
−57..164 scaled to [0, 1], gamma 2, foreground crop. The resampling samples the CT linearly at each
model voxel's centre (MONAI's ``Spacing``, as the paper did at 1.5 mm) or, with
``image_resampling="box"``, averages the CT over each model voxel's footprint: on a grid several
times coarser than the CT, linear sampling reads one CT voxel in tens and misses fat planes thinner
than the model spacing wherever no sample falls in them; the footprint average shows them as the
partial volume a CT acquired at that spacing would, the same average the training targets take of
the labels (:func:`labels_to_model_probs`). The model grid is described by its own affine
(RAS mm), so the inverse is a resampling in world space: every CT voxel looks up its position on the
model grid. Labels go back as class probabilities interpolated linearly and argmaxed on the CT
grid (nearest-neighbour at a coarse model spacing loses thin structures), in slabs so memory stays
bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from seg.preprocess_config import PreprocessConfig
from seg.volume import LPS_TO_RAS, Volume

if TYPE_CHECKING:
    from monai.transforms import Compose


@dataclass
class ModelGridImage:
    """The preprocessed image on the model grid plus what is needed to go back."""

    image: np.ndarray  # float32 (X, Y, Z), values in [0, 1]
    affine: np.ndarray  # RAS mm of model-grid voxel indices (after the crop)
    labels: np.ndarray | None = None  # uint8 (X, Y, Z) when labels were given (training)
    extra: dict = field(default_factory=dict)


def _fg(threshold: float):
    return lambda x: x > threshold


def spatial_transforms(cfg: PreprocessConfig, keys: tuple[str, ...] = ("image",)) -> Compose:
    """MONAI dictionary transforms: orientation, spacing, window, gamma, foreground crop."""
    from monai.transforms import (
        AdjustContrastd,
        Compose,
        CropForegroundd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    modes = tuple("bilinear" if k == "image" else "nearest" for k in keys)
    lo, hi = cfg.hu_window
    return Compose(
        [
            Orientationd(keys=keys, axcodes=cfg.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys=keys, pixdim=cfg.spacing_mm, mode=modes, padding_mode="border"),
            ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
            AdjustContrastd(keys="image", gamma=cfg.gamma),
            CropForegroundd(
                keys=keys,
                source_key="image",
                select_fn=_fg(cfg.foreground_threshold),
                margin=cfg.crop_margin_vox,
                allow_smaller=True,
            ),
        ]
    )


def to_model_grid(ct: Volume, cfg: PreprocessConfig, labels: Volume | None = None) -> ModelGridImage:
    """CT (and optionally its labels, same grid) → model grid, the paper's way."""
    from monai.data import MetaTensor

    ras = ct.ras_affine()
    data = {
        "image": MetaTensor(
            torch.as_tensor(ct.array.astype(np.float32))[None],
            affine=torch.as_tensor(ras, dtype=torch.float64),
        )
    }
    keys: tuple[str, ...] = ("image",)
    if labels is not None:
        if labels.shape != ct.shape or not np.allclose(labels.affine, ct.affine, atol=1e-3):
            raise ValueError("labels must lie on the CT's grid")
        data["label"] = MetaTensor(
            torch.as_tensor(labels.array.astype(np.float32))[None],
            affine=torch.as_tensor(ras, dtype=torch.float64),
        )
        keys = ("image", "label")
    out = spatial_transforms(cfg, keys)(data)
    img = out["image"]
    affine = np.asarray(img.affine, dtype=np.float64)
    image = img.numpy()[0].astype(np.float32)
    if cfg.image_resampling == "box":
        image = _box_image(ct, affine, image, cfg)
    lab = None
    if labels is not None:
        lab = np.rint(out["label"].numpy()[0]).astype(np.uint8)
    return ModelGridImage(image=image, affine=affine, labels=lab)


def _box_image(ct: Volume, model_affine: np.ndarray, sampled: np.ndarray,
               cfg: PreprocessConfig) -> np.ndarray:
    """The CT's mean over each model voxel's footprint, windowed and gamma-corrected as the sampled
    image was, on the same (cropped) model grid. Model voxels reaching past the CT average the part
    inside it (centres past the border take the border's footprint, as ``Spacing`` pads with the
    border). Grids not parallel to the CT's axes (gantry tilt) keep the linearly sampled image."""
    from monai.transforms import AdjustContrast, ScaleIntensityRange

    m = np.linalg.inv(LPS_TO_RAS @ ct.affine) @ model_affine  # model voxel -> CT voxel
    ct_axis = _ct_axis_of_model_axes(m)
    if ct_axis is None:
        return sampled
    shape = tuple(int(n) for n in sampled.shape)
    centres, widths, span = [], [], []
    for a, p in enumerate(ct_axis):  # model axis a runs along CT axis p
        n = ct.shape[p]
        widths.append(abs(float(m[p, a])))
        centres.append(np.clip(m[p, a] * np.arange(shape[a], dtype=np.float64) + m[p, 3], 0.0, n - 1.0))
        lo = max(0, int(np.floor(centres[a].min() - widths[a] / 2 + 0.5)))
        span.append(slice(lo, min(n, int(np.ceil(centres[a].max() + widths[a] / 2 + 0.5)))))
    # only the CT the footprints reach, the most-reducing axis first: the later products are smaller
    hu = np.asarray(ct.array[tuple(span[ct_axis.index(p)] for p in range(3))], dtype=np.float32)
    for a in sorted(range(3), key=lambda a: widths[a], reverse=True):
        p = ct_axis[a]
        hu = _box_mean_along(hu, p, centres[a] - span[a].start, widths[a])
    cover = []
    for a, p in enumerate(ct_axis):
        n, w = ct.shape[p], max(widths[a], 1e-6)
        inside = np.minimum(centres[a] + w / 2, n - 0.5) - np.maximum(centres[a] - w / 2, -0.5)
        cover.append(np.clip(inside / w, 1e-6, 1.0).astype(np.float32))
    hu = np.transpose(hu, ct_axis)  # CT axis order -> model axis order
    hu /= cover[0][:, None, None] * cover[1][None, :, None] * cover[2][None, None, :]
    lo, hi = cfg.hu_window
    x = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(torch.from_numpy(hu))
    x = AdjustContrast(gamma=cfg.gamma)(x)
    return np.asarray(x, dtype=np.float32)


def _grid_coords(
    ct: Volume, model_affine: np.ndarray, model_shape: tuple[int, int, int], k0: int, k1: int
) -> torch.Tensor:
    """grid_sample coordinates (normalised, align_corners=True) of CT slices k0..k1 on the model grid."""
    m = np.linalg.inv(model_affine) @ (LPS_TO_RAS @ ct.affine)
    ni, nj = ct.shape[0], ct.shape[1]
    i, j, k = np.meshgrid(
        np.arange(ni, dtype=np.float32),
        np.arange(nj, dtype=np.float32),
        np.arange(k0, k1, dtype=np.float32),
        indexing="ij",
    )
    pts = np.stack([i, j, k], -1) @ m[:3, :3].T.astype(np.float32) + m[:3, 3].astype(np.float32)
    # grid_sample on a (N, C, D, H, W) tensor wants (x, y, z) = (W, H, D) order, normalised to [-1, 1].
    sizes = np.array(model_shape, dtype=np.float32)
    norm = 2.0 * pts / np.maximum(sizes - 1.0, 1.0) - 1.0
    return torch.from_numpy(norm[..., ::-1].copy())  # (ni, nj, nk, 3) as (z, y, x) → (W, H, D)


def probabilities_to_ct_grid(
    probs: torch.Tensor, model_affine: np.ndarray, ct: Volume, slab: int = 16
) -> np.ndarray:
    """Class probabilities (C, X, Y, Z) on the model grid → uint8 argmax labels on the CT grid.

    Linear interpolation of the probabilities, argmax per CT voxel, one slab of CT slices at a time.
    CT voxels outside the model grid (cropped-away background) get label 0.
    """
    probs = probs.float()
    c = probs.shape[0]
    shape = tuple(int(s) for s in probs.shape[1:])
    vol = probs[None]  # (1, C, X, Y, Z) treated as (N, C, D, H, W) with D=X, H=Y, W=Z
    out = np.zeros(ct.shape, dtype=np.uint8)
    for k0 in range(0, ct.shape[2], slab):
        k1 = min(ct.shape[2], k0 + slab)
        g = _grid_coords(ct, model_affine, shape, k0, k1)
        # grid (N, D_out, H_out, W_out, 3) with last dim (x→W, y→H, z→D).
        samp = torch.nn.functional.grid_sample(
            vol, g[None], mode="bilinear", padding_mode="zeros", align_corners=True
        )[0]
        inside = (g.abs() <= 1.0 + 1e-6).all(-1)
        lab = samp.argmax(0)
        lab[~inside] = 0
        if c:
            out[:, :, k0:k1] = lab.numpy().astype(np.uint8)
    return out


def labels_to_ct_grid(
    labels: np.ndarray, model_affine: np.ndarray, ct: Volume, num_classes: int, slab: int = 16
) -> np.ndarray:
    """A model-grid label map back onto the CT grid (one-hot, linear, argmax): the round-trip path."""
    onehot = torch.nn.functional.one_hot(torch.as_tensor(labels.astype(np.int64)), num_classes)
    return probabilities_to_ct_grid(onehot.permute(3, 0, 1, 2).float(), model_affine, ct, slab)


def labels_to_model_probs(
    labels: Volume, model_affine: np.ndarray, model_shape: tuple[int, int, int], num_classes: int
) -> np.ndarray:
    """Partial-volume class fractions (C, X, Y, Z) as uint8 ×255 of a CT-grid label map on the model grid.

    The fraction of each model voxel's footprint that each class covers: the volume-preserving way down
    to a coarser grid (nearest-neighbour is not; training on nearest labels at 4 mm caps the CT-grid
    Dice of a perfect model near 0.93, partial volumes near 0.97, docs/models.md). Axis-parallel grids
    (the usual axial CT) are averaged exactly and separably; oblique ones approximately.
    """
    from scipy.ndimage import find_objects

    m = np.linalg.inv(LPS_TO_RAS @ labels.affine) @ model_affine  # model voxel -> CT voxel
    arr = np.asarray(labels.array)
    ct_axis = _ct_axis_of_model_axes(m)
    frac_sum = np.zeros(model_shape, dtype=np.float32)
    out = np.zeros((num_classes, *model_shape), dtype=np.uint8)
    for c, box in enumerate(find_objects(arr, max_label=num_classes - 1), start=1):
        if box is None:
            continue
        if ct_axis is None:
            frac = _oblique_fraction(arr == c, m, model_shape)
        else:  # only the class's bounding box: outside it every fraction is zero
            frac = (arr[box] == c).astype(np.float32)
            for a, p in enumerate(ct_axis):  # model axis a runs along CT axis p
                centres = m[p, a] * np.arange(model_shape[a], dtype=np.float64) + m[p, 3] - box[p].start
                frac = _box_mean_along(frac, p, centres, abs(float(m[p, a])))
            frac = np.transpose(frac, ct_axis)  # CT axis order -> model axis order
        frac_sum += frac
        out[c] = np.clip(frac * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out[0] = np.clip((1.0 - frac_sum) * 255.0 + 0.5, 0, 255).astype(np.uint8)  # the rest is background
    return out


def _ct_axis_of_model_axes(m: np.ndarray, tol: float = 1e-6) -> list[int] | None:
    """For each model axis, the CT axis it runs along, when every axis pairs with one; else None."""
    lin = np.abs(m[:3, :3])  # rows: CT axes, columns: model axes
    axes = [int(np.argmax(lin[:, a])) for a in range(3)]
    if sorted(axes) != [0, 1, 2]:
        return None
    if any(np.delete(lin[:, a], p).max() > tol * lin[p, a] for a, p in enumerate(axes)):
        return None
    return axes


def _box_mean_along(arr: np.ndarray, axis: int, centres: np.ndarray, width: float) -> np.ndarray:
    """Exact mean of a voxelwise-constant 3-D array over [c - w/2, c + w/2] (voxel units) along ``axis``.

    Voxel k covers [k - 0.5, k + 0.5] and weighs by its overlap with the box; outside the array
    counts as zero. One matrix product per axis, in torch (numpy's cumulative sum along strided
    memory, and its batched matmul, were several times slower on a whole CT).
    """
    w = max(width, 1e-6)
    k = np.arange(arr.shape[axis], dtype=np.float64)
    c = np.asarray(centres, dtype=np.float64)[:, None]
    overlap = np.minimum(c + w / 2, k + 0.5) - np.maximum(c - w / 2, k - 0.5)
    weights = torch.from_numpy((np.clip(overlap, 0.0, None) / w).astype(np.float32))  # (len(centres), n)
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if axis == 0:
        out = (weights @ x.reshape(x.shape[0], -1)).reshape(len(weights), *x.shape[1:])
    elif axis == 1:
        out = torch.matmul(weights, x)  # one product per index of axis 0
    else:
        out = x @ weights.T
    return out.numpy()


def _oblique_fraction(mask: np.ndarray, m: np.ndarray, model_shape: tuple[int, int, int]) -> np.ndarray:
    """Box average over the footprint's rounded size, sampled linearly at the model voxel centres."""
    from scipy.ndimage import map_coordinates, uniform_filter

    foot = np.abs(m[:3, :3]).sum(1)  # footprint of one model voxel in CT voxels per CT axis
    size = [max(1, int(round(f))) for f in foot]
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in model_shape], indexing="ij"), 0)
    pts = np.tensordot(m[:3, :3].astype(np.float32), idx, axes=1) + m[:3, 3, None, None, None].astype(
        np.float32
    )
    # An even box of size s averages voxels k - s/2 .. k + s/2 - 1: its centre lies half a voxel low.
    pts += np.array([0.5 if s % 2 == 0 else 0.0 for s in size], np.float32)[:, None, None, None]
    frac = uniform_filter(mask.astype(np.float32), size=size, mode="constant")
    return map_coordinates(frac, pts, order=1, mode="constant")
