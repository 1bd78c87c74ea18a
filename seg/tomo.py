"""Parallel-beam projection and filtered backprojection of axial slices.

Why here: the phantom makes its implant's streaks the way a scanner does, by corrupting the
projections through metal and reconstructing (:mod:`seg.phantom.metal_ct`), and a metal artefact
reduction undoes them in the same projection space; both need one forward projector and one
filtered backprojection (FBP) of matching geometry. Projections are in pixel units (a sum of pixel
values along each ray), so ``reconstruct(project(x)) ≈ x``.

Rotation by ``grid_sample`` keeps it short and fast enough on two CPU cores: a slice of 250² pixels
with 360 angles projects and reconstructs in a fraction of a second.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=8)
def _rotation_grids(size: int, n_angles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, backward) sampling grids [A, n, n, 2]; the backward one reads a 1-row sinogram."""
    th = torch.arange(n_angles, dtype=torch.float64) * math.pi / n_angles
    c, s = torch.cos(th), torch.sin(th)
    mat = torch.zeros(n_angles, 2, 3, dtype=torch.float64)
    mat[:, 0, 0], mat[:, 0, 1], mat[:, 1, 0], mat[:, 1, 1] = c, -s, s, c
    fwd = F.affine_grid(mat, [n_angles, 1, size, size], align_corners=False).float()
    mat[:, 0, 1], mat[:, 1, 0] = s, -s  # the inverse rotation
    back = F.affine_grid(mat, [n_angles, 1, size, size], align_corners=False).float()
    back[..., 1] = 0.0  # every pixel reads the one row of its angle's filtered projection
    return fwd, back


@functools.lru_cache(maxsize=8)
def _ramp(size: int) -> tuple[int, torch.Tensor]:
    """(padded length, ramp filter in rfft layout) for projections of ``size`` bins."""
    pad = 2 ** math.ceil(math.log2(2 * size))
    return pad, 2.0 * torch.fft.rfftfreq(pad).abs()


@dataclass(frozen=True)
class ParallelBeam:
    """``n_angles`` parallel projections over 180° of a square ``size``² image, ``size`` bins each."""

    size: int
    n_angles: int

    @classmethod
    def covering(cls, shape: tuple[int, int], n_angles: int) -> ParallelBeam:
        """The smallest geometry whose field of view holds a ``shape`` slice at any angle."""
        n = int(math.ceil(math.hypot(*shape))) + 2
        return cls(size=n + n % 2, n_angles=n_angles)

    def _offsets(self, shape: tuple[int, int]) -> tuple[int, int]:
        return (self.size - shape[0]) // 2, (self.size - shape[1]) // 2

    def embed(self, images: np.ndarray) -> torch.Tensor:
        """[C, h, w] (or [h, w]) slices, centred in zero-filled [C, size, size] float32."""
        images = np.asarray(images, np.float32)
        if images.ndim == 2:
            images = images[None]
        h, w = images.shape[1:]
        y0, x0 = self._offsets((h, w))
        out = torch.zeros(images.shape[0], self.size, self.size)
        out[:, y0:y0 + h, x0:x0 + w] = torch.from_numpy(images)
        return out

    def crop(self, images: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
        """The inverse of :meth:`embed`: [C, size, size] -> [C, h, w] numpy."""
        y0, x0 = self._offsets(shape)
        return images[:, y0:y0 + shape[0], x0:x0 + shape[1]].numpy()

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """[C, size, size] -> sinograms [C, n_angles, size]."""
        fwd, _ = _rotation_grids(self.size, self.n_angles)
        with torch.no_grad():
            rot = F.grid_sample(images[None].expand(self.n_angles, *images.shape), fwd, align_corners=False)
        return rot.sum(dim=2).permute(1, 0, 2).contiguous()

    def reconstruct(self, sinograms: torch.Tensor) -> torch.Tensor:
        """Ramp-filtered backprojection: [C, n_angles, size] -> [C, size, size]."""
        _, back = _rotation_grids(self.size, self.n_angles)
        pad, ramp = _ramp(self.size)
        with torch.no_grad():
            filtered = torch.fft.irfft(torch.fft.rfft(sinograms, n=pad, dim=-1) * ramp, n=pad, dim=-1)
            rows = filtered[..., :self.size].permute(1, 0, 2)[:, :, None, :]  # [A, C, 1, size]
            smear = F.grid_sample(rows.contiguous(), back, align_corners=False)  # [A, C, size, size]
        return smear.sum(0) * (math.pi / (2 * self.n_angles))
