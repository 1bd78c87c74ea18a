"""Inference: CT Volume → 30-class label Volume on the CT's own grid.

Preprocess onto the model grid, sliding-window inference on MONAI's window grid with every window
computed once (:mod:`seg.sliding`: windows visited along the last axis, blended into a band of
ROI-depth float logits, finished slices released; the whole model grid is held only as uint8
probabilities), then linear resampling of the probabilities back onto the CT grid and argmax there;
last, where the package asks for it, the labels' muscle and bone edges are re-decided by the CT
number (:mod:`seg.hu_refine`). Where the package's preprocessing asks for it, the implant's streaks
are reduced first (:mod:`seg.mar`), so every later step reads the corrected CT. CUDA with autocast
when present; on CPU fp32 unless bf16 autocast is asked for (see benchmarks/inference.py for the
speed and agreement figures that decide it).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from seg.hu_refine import HURefinement, refine_labels
from seg.mar import as_configured
from seg.model import ModelPackage
from seg.preprocess import to_model_grid
from seg.recipe import cpu_precision
from seg.sliding import stream_windows
from seg.volume import LPS_TO_RAS, Volume

log = logging.getLogger(__name__)

PROB_SCALE = 255.0


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        dt = (
            torch.bfloat16
            if precision in ("bf16", "auto") and torch.cuda.is_bf16_supported()
            else torch.float16
        )
        return torch.autocast("cuda", dtype=dt)
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_precision() -> str:
    """auto: reduced precision on CUDA, fp32 on CPU (override with DICOMNODE_CPU_PRECISION=bf16)."""
    return cpu_precision()


def _default_sw_batch(device: torch.device, roi: tuple[int, ...], requests: int = 1) -> int:
    """2 on CUDA; on CPU about four 64^3 windows' worth of voxels (the demo model: 4, 7 % faster than 2;
    a paper-size 96^3 window: 1, as fast as 2 and ~1.5 GB of activations less), and at least one
    window for each of an OpenVINO network's parallel infer ``requests``: with fewer, a stream idles
    (paper-size UNETR, bf16, 2 streams: one window a batch 35.8 s a whole thigh, two 24.9 s)."""
    if device.type == "cuda":
        return 2
    return int(max(1, requests, min(4, 4 * 64**3 // int(np.prod(roi)))))


def predict_probabilities(
    model: ModelPackage,
    image: np.ndarray,
    precision: str | None = None,
    progress: bool = False,
    overlap: float = 0.25,
    sw_batch: int | None = None,
    mirror: bool | None = None,
) -> np.ndarray:
    """Class probabilities (C, X, Y, Z) as uint8 (×255) on the model grid.

    Every window of MONAI's grid (gaussian weighting) runs once, ``sw_batch`` at a time (default:
    :func:`_default_sw_batch`); :func:`seg.sliding.stream_windows` keeps one ROI-deep band of float
    logits and hands back finished slices, which are softmaxed and stored as uint8 here. The array
    is a (C, X, Y, Z) view of (Z, C, X, Y) memory: each finished slice is one contiguous block (with Z
    innermost every slice touched every page), and the resampling back reads whole slices.
    """
    precision = precision or default_precision()
    net, dev = model.network, model.device
    sw_batch = sw_batch or _default_sw_batch(dev, model.roi_size, int(getattr(net, "requests", 1)))
    c = int(model.meta.architecture.args["out_channels"])
    nx, ny, nz = image.shape
    probs = np.zeros((nz, c, nx, ny), dtype=np.uint8).transpose(1, 2, 3, 0)

    if mirror is None:
        mirror = model.inference.mirror_x

    def run(x: torch.Tensor) -> torch.Tensor:
        with _autocast(dev, precision):
            if not mirror:
                return net(x)
            # The left-right mirror of each window too (the classes are not lateralised, and the
            # model was trained on mirrored crops): the mean of both views' logits.
            a, b = net(torch.cat([x, x.flip(2)])).chunk(2)
            return (a + b.flip(2)) * 0.5

    def store(z0: int, z1: int, logits: torch.Tensor) -> None:
        p = torch.softmax(logits.permute(3, 0, 1, 2), 1).mul_(PROB_SCALE).add_(0.5).to(torch.uint8)
        probs[..., z0:z1] = p.cpu().numpy().transpose(1, 2, 3, 0)

    stream_windows(image, model.roi_size, run, store, overlap=overlap, mode="gaussian", sw_batch=sw_batch,
                   device=dev, progress=progress)
    return probs


@dataclass(frozen=True)
class CTGridPrediction:
    """The network's prediction taken back onto the CT grid."""

    labels: np.ndarray  # uint8 class labels
    background: np.ndarray | None  # uint8 background probability ×255 (255 outside the model grid)


def resample_prediction(probs: np.ndarray, model_affine: np.ndarray, ct: Volume, background: bool = False,
                        slab: int = 16) -> CTGridPrediction:
    """uint8 probabilities on the model grid → uint8 labels on the CT grid (linear + argmax), and with
    ``background`` the background channel on the CT grid, interpolated in the same pass (what the HU
    refinement's gates read, :attr:`HURefinement.reads_background`).

    Grids whose axes are parallel (the usual axial CT: the model grid is the CT grid reoriented and
    resampled) are interpolated separably, one axis at a time; any other orientation goes through
    trilinear ``grid_sample``. Both clamp at the model grid's border and give label 0 outside it.
    """
    m = np.linalg.inv(model_affine) @ (LPS_TO_RAS @ ct.affine)
    axes = _axis_map(m)
    if axes is not None:
        return _separable(probs, m, axes, ct.shape, slab, background)
    return _sampled(probs, m, ct.shape, slab, background)


def probabilities_to_labels(probs: np.ndarray, model_affine: np.ndarray, ct: Volume,
                            slab: int = 16) -> np.ndarray:
    """The labels of :func:`resample_prediction` alone."""
    return resample_prediction(probs, model_affine, ct, slab=slab).labels


def _axis_map(m: np.ndarray, tol: float = 1e-6) -> list[int] | None:
    """For each CT axis, the model axis it runs along, when every CT axis is parallel to one; else None."""
    lin = np.abs(m[:3, :3])
    axes = [int(np.argmax(lin[:, p])) for p in range(3)]
    if sorted(axes) != [0, 1, 2]:
        return None
    for p, a in enumerate(axes):
        if np.delete(lin[:, p], a).max() > tol * lin[a, p]:
            return None
    return axes


def _linear_taps(coord: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Lower/upper model index, upper weight and the inside mask of 1-D model coordinates."""
    inside = (coord >= -1e-3) & (coord <= size - 1 + 1e-3)
    c = np.clip(coord, 0.0, size - 1)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    w = (c - lo).astype(np.float32)
    return torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(w), inside


def _separable(probs: np.ndarray, m: np.ndarray, axes: list[int], shape: tuple[int, ...], slab: int,
               background: bool) -> CTGridPrediction:
    """Linear interpolation along the slab axis, then along the row and column axes only where the
    taps' classes differ (:func:`_bilinear_labels`), in slabs of ``slab`` CT slices; the background
    channel, when asked for, bilinear in-plane from the same slab-axis interpolation."""
    taps = []
    for p, a in enumerate(axes):  # CT axis p samples model axis a at m[a, p] * index + m[a, 3]
        coord = m[a, p] * np.arange(shape[p], dtype=np.float64) + m[a, 3]
        taps.append(_linear_taps(coord, probs.shape[1 + a]))
    inside = taps[0][3][:, None, None] & taps[1][3][None, :, None] & taps[2][3][None, None, :]
    (lo0, hi0, w0, _), (lo1, hi1, w1, _) = taps[0], taps[1]
    # (slab axis, C, row axis, column axis), contiguous: a slab's model slices are then whole blocks
    # (a gather along the last axis of the C-first layout took most of this function's time)
    src = torch.from_numpy(np.ascontiguousarray(probs.transpose(1 + axes[2], 0, 1 + axes[0], 1 + axes[1])))
    out = np.zeros(shape, dtype=np.uint8)
    bg = np.full(shape, 255, dtype=np.uint8) if background else None
    for k0 in range(0, shape[2], slab):
        k1 = min(shape[2], k0 + slab)
        here = inside[:, :, k0:k1]
        if not here.any():
            continue
        lo, hi, w = taps[2][0][k0:k1], taps[2][1][k0:k1], taps[2][2][k0:k1]
        a, b = src.index_select(0, lo).float(), src.index_select(0, hi).float()
        x = torch.empty((a.shape[1], a.shape[0], *a.shape[2:]))  # (C, s, m0, m1): classes outermost
        torch.lerp(a.transpose(0, 1), b.transpose(0, 1), w.view(1, -1, 1, 1), out=x)
        if bg is not None:
            v = torch.lerp(x[0].index_select(1, lo0), x[0].index_select(1, hi0), w0.view(1, -1, 1))
            v = torch.lerp(v.index_select(2, lo1), v.index_select(2, hi1), w1.view(1, 1, -1))
            v = v.add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            bg[:, :, k0:k1] = np.where(here, v, 255)
        lab = _bilinear_labels(x, (lo0, hi0, w0), (lo1, hi1, w1)).numpy()
        lab[~here] = 0
        out[:, :, k0:k1] = lab
    return CTGridPrediction(out, bg)


def _first_max(x: torch.Tensor) -> torch.Tensor:
    """uint8 argmax over the classes (axis 0) of ``x``, the first maximal class on ties; a running
    max, since torch's argmax over the outer axis is several times slower."""
    first = torch.zeros(x.shape[1:], dtype=torch.uint8)
    best = x[0].clone()
    for c in range(1, x.shape[0]):
        first.masked_fill_(x[c] > best, c)
        torch.maximum(best, x[c], out=best)
    return first


def _bilinear_labels(x: torch.Tensor, taps0: tuple, taps1: tuple) -> torch.Tensor:
    """argmax over classes of ``x`` (C, s, m0, m1; contiguous) interpolated linearly along its last
    two axes onto (n0, n1, s).

    Where the four taps of a voxel share their argmax class, that class is the voxel's argmax (every
    class's value is the same convex combination of its taps', and no lower class ties at a tap), so
    only the voxels whose taps disagree, at class boundaries (a few % of them), are interpolated,
    row axis first and then column axis as the values were before; ties go to the lower class.
    """
    (lo0, hi0, w0), (lo1, hi1, w1) = taps0, taps1
    first = _first_max(x).permute(1, 2, 0)  # (m0, m1, s)
    at_lo, at_hi = first.index_select(0, lo0), first.index_select(0, hi0)
    lab = at_lo.index_select(1, lo1)
    unsure = lab != at_lo.index_select(1, hi1)
    unsure |= lab != at_hi.index_select(1, lo1)
    unsure |= lab != at_hi.index_select(1, hi1)
    i, j, k = unsure.nonzero(as_tuple=True)
    if i.numel():
        m0, m1 = x.shape[2], x.shape[3]
        flat = x.view(x.shape[0], -1)  # one row per class

        def taps(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # (C, voxels)
            return flat.index_select(1, (k * m0 + rows) * m1 + cols)

        a, b, p, q, wy = lo0[i], hi0[i], lo1[j], hi1[j], w1[j]
        row_a = torch.lerp(taps(a, p), taps(a, q), wy)
        row_b = torch.lerp(taps(b, p), taps(b, q), wy)
        lab[i, j, k] = _first_max(torch.lerp(row_a, row_b, w0[i]))
    return lab


def _sampled(probs: np.ndarray, m: np.ndarray, shape: tuple[int, ...], slab: int,
             background: bool) -> CTGridPrediction:
    """Trilinear ``grid_sample`` of the part of the model grid each slab of CT slices touches."""
    c, nx, ny, nz = probs.shape
    ni, nj, nk = shape
    out = np.zeros(shape, dtype=np.uint8)
    bg = np.full(shape, 255, dtype=np.uint8) if background else None
    ii, jj = np.meshgrid(np.arange(ni, dtype=np.float32), np.arange(nj, dtype=np.float32), indexing="ij")
    sizes = np.array([nx, ny, nz], dtype=np.float32)
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        kk = np.arange(k0, k1, dtype=np.float32)
        pts = np.stack(np.broadcast_arrays(ii[..., None], jj[..., None], kk[None, None, :]), -1) @ m[
            :3, :3
        ].T.astype(np.float32) + m[:3, 3].astype(np.float32)
        inside = np.all((pts >= -1e-3) & (pts <= sizes - 1 + 1e-3), axis=-1)
        if not inside.any():
            continue
        sel = pts[inside]
        lo = np.maximum(np.floor(sel.min(0)).astype(int), 0)
        hi = np.minimum(np.ceil(sel.max(0)).astype(int) + 1, [nx, ny, nz])
        sub = torch.from_numpy(probs[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32))
        local = pts - lo.astype(np.float32)
        span = np.maximum((hi - lo - 1).astype(np.float32), 1.0)
        g = torch.from_numpy((2.0 * local / span - 1.0)[..., ::-1].astype(np.float32))
        samp = torch.nn.functional.grid_sample(
            sub[None], g[None], mode="bilinear", padding_mode="border", align_corners=True
        )[0]
        lab = samp.argmax(0).numpy().astype(np.uint8)
        lab[~inside] = 0
        out[:, :, k0:k1] = lab
        if bg is not None:
            v = samp[0].add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()
            bg[:, :, k0:k1] = np.where(inside, v, 255)
    return CTGridPrediction(out, bg)


@dataclass(frozen=True)
class NetworkPass:
    """One network pass over a CT, taken back onto the CT's grid: what every HU refinement rule
    starts from, so that several rules can be compared on one (costly) pass."""

    ct: Volume  # the CT as the network read it (the package's metal artefact reduction applied)
    prediction: CTGridPrediction

    def labels(self, rule: HURefinement | None) -> Volume:
        """The label map on the CT grid under ``rule`` (None: the network's labels alone)."""
        labels = self.prediction.labels
        if rule is not None:
            labels = refine_labels(self.ct.array, labels, self.ct.spacing_mm, rule,
                                   background=self.prediction.background)
        return self.ct.with_array(labels)


def network_pass(ct: Volume, model: ModelPackage, progress: bool = False, precision: str | None = None,
                 background: bool | None = None) -> NetworkPass:
    """The package's preprocessing, sliding-window network and resampling back onto ``ct``'s grid.

    ``background``: keep the background probability on the CT grid (default: when the package's own
    HU refinement reads it, :attr:`HURefinement.reads_background`).
    """
    if background is None:
        rule = model.inference.hu_refinement
        background = rule is not None and rule.reads_background
    hu = as_configured(ct, model.preprocess.metal_artefact_reduction, model.streak_net)
    mg = to_model_grid(hu, model.preprocess)
    probs = predict_probabilities(model, mg.image, precision=precision, progress=progress)
    return NetworkPass(hu, resample_prediction(probs, mg.affine, ct, background=background))


def segment(ct: Volume, model: ModelPackage, progress: bool = False, precision: str | None = None,
            hu_refinement: bool = True) -> Volume:
    """Label map (uint8, 30 classes) of ``ct`` on its own grid.

    ``hu_refinement=False`` gives the network's labels alone, even where the package asks for the
    refinement (``dicomnode evaluate --network-only`` reports both). The labels are on ``ct``'s
    grid whether or not its metal artefacts were reduced first.
    """
    done = network_pass(ct, model, progress=progress, precision=precision,
                        background=None if hu_refinement else False)
    return done.labels(model.inference.hu_refinement if hu_refinement else None)
