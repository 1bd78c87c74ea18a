"""Inference: CT Volume → 30-class label Volume on the CT's own grid.

Preprocess onto the model grid, MONAI sliding-window inference slab by slab along the last axis
(memory stays bounded: one slab of float logits, the whole model grid only as uint8 probabilities),
then linear resampling of the probabilities back onto the CT grid and argmax there. CUDA with
autocast when present; on CPU fp32 unless bf16 autocast is asked for (see benchmarks/inference.py for
the speed and agreement figures that decide it).
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

from seg.model import ModelPackage
from seg.preprocess import to_model_grid
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
    return os.environ.get("DICOMNODE_CPU_PRECISION", "auto")


def predict_probabilities(
    model: ModelPackage,
    image: np.ndarray,
    precision: str | None = None,
    progress: bool = False,
    overlap: float = 0.25,
    sw_batch: int | None = None,
    slab_mb: float = 768.0,
) -> np.ndarray:
    """Class probabilities (C, X, Y, Z) as uint8 (×255) on the model grid, slab by slab along Z.

    ``slab_mb`` bounds the float logits of one slab (the uint8 probabilities of the whole grid come on top).
    ``sw_batch`` windows run at once: default 2 on CUDA, 1 on CPU (where batching gains nothing and a
    second paper-size window costs another ~1.5 GB of activations).
    """
    from monai.inferers import sliding_window_inference

    precision = precision or default_precision()
    roi = model.roi_size
    net, dev = model.network, model.device
    sw_batch = sw_batch or (2 if dev.type == "cuda" else 1)
    nx, ny, nz = image.shape
    c = int(model.meta["architecture"]["args"]["out_channels"])
    probs = np.zeros((c, nx, ny, nz), dtype=np.uint8)
    rz = roi[2]
    margin = rz // 2
    # Slab length from a memory budget for its float32 logits; at least one ROI of core plus margins.
    per_slice = c * max(nx, roi[0]) * max(ny, roi[1]) * 4
    core = max(rz, int(slab_mb * 2**20 // per_slice) - 2 * margin)
    starts = list(range(0, nz, core))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(starts), desc="segment", unit="slab")
    for z0 in starts:
        z1 = min(nz, z0 + core)
        a, b = max(0, z0 - margin), min(nz, z1 + margin)
        x = torch.from_numpy(np.ascontiguousarray(image[:, :, a:b], dtype=np.float32))[None, None]
        with torch.inference_mode(), _autocast(dev, precision):
            logits = sliding_window_inference(
                x,
                roi,
                sw_batch,
                net,
                overlap=overlap,
                mode="gaussian",
                sw_device=dev,
                device=torch.device("cpu"),
            )
        for k0 in range(z0, z1, 8):  # a few slices at a time: no second slab-sized float buffer
            k1 = min(z1, k0 + 8)
            p = torch.softmax(logits[0, :, :, :, k0 - a : k1 - a].float(), 0)
            probs[:, :, :, k0:k1] = p.mul_(PROB_SCALE).add_(0.5).to(torch.uint8).numpy()
        del logits, p
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return probs


def probabilities_to_labels(
    probs: np.ndarray, model_affine: np.ndarray, ct: Volume, slab: int = 8
) -> np.ndarray:
    """uint8 probabilities on the model grid → uint8 labels on the CT grid (linear + argmax).

    For each slab of CT slices only the part of the model grid it touches is turned into floats.
    """
    c, nx, ny, nz = probs.shape
    m = np.linalg.inv(model_affine) @ (LPS_TO_RAS @ ct.affine)
    ni, nj, nk = ct.shape
    out = np.zeros(ct.shape, dtype=np.uint8)
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
    return out


def segment(ct: Volume, model: ModelPackage, progress: bool = False, precision: str | None = None) -> Volume:
    """Label map (uint8, 30 classes) of ``ct`` on its own grid."""
    mg = to_model_grid(ct, model.preprocess)
    probs = predict_probabilities(model, mg.image, precision=precision, progress=progress)
    labels = probabilities_to_labels(probs, mg.affine, ct)
    return ct.with_array(labels)
