"""A learned correction of the streaks the LI reduction leaves (preprocessing "li+learned").

Why: on streak-free twins of the analysis phantoms the shipped network measures 35 of 36 atrophied
muscles within 5 pp, against 29 after LI (``benchmarks/streak_oracle.py``); LI leaves about half of
the streak (the photon-starved rays' fine radial lines), and none of its settings reaches it
(docs/models.md). A small 2-D U-Net sees each axial slice holding metal after LI, on a 2.5 mm work
grid (the CT number and the metal's share of each pixel), and predicts the streak left in it; the
prediction is resampled bilinearly onto the CT's grid and subtracted from the body outside the metal,
as :mod:`seg.mar` subtracts its own correction. It is trained on pairs the phantom makes (a
post-operative phantom after LI, and its streak-free twin: ``scripts/train_streak_net.py``), as
supervised metal artefact reduction is trained on simulated artefacts; a site's scanner makes other
streaks, so a site would train it on its own simulation or leave it out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seg.mar import metal_reach_box, stored_as
from seg.metal_proximity import METAL_HU, slices_with_metal
from seg.volume import Volume

WORK_MM = 2.5  # in-plane pixel the correction is predicted on (seg.mar's work grid)
HU_SCALE = 100.0  # the network's output unit: the streak in hundreds of HU
AIR_HU = -900.0  # at or below this a voxel is outside the body: never corrected
REACH_MM = 90.0  # corrected within this in-plane distance of the metal's box, as seg.mar reaches
CHANNELS = (16, 32, 64, 96)  # encoder widths, finest first; the decoder mirrors them
DEPTH = len(CHANNELS) - 1  # poolings: a work-grid slice is padded to a multiple of 2**DEPTH


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.LeakyReLU(0.1),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.LeakyReLU(0.1))


class StreakResidualNet(nn.Module):
    """U-Net: (CT number / 1000, metal share) on the work grid -> the streak left, / :data:`HU_SCALE`."""

    def __init__(self, channels: tuple[int, ...] = CHANNELS) -> None:
        super().__init__()
        ins = (2, *channels[:-1])
        self.down = nn.ModuleList(_block(i, o) for i, o in zip(ins, channels, strict=True))
        self.up = nn.ModuleList(nn.ConvTranspose2d(channels[k + 1], channels[k], 2, 2)
                                for k in reversed(range(len(channels) - 1)))
        self.merge = nn.ModuleList(_block(2 * channels[k], channels[k])
                                   for k in reversed(range(len(channels) - 1)))
        self.out = nn.Conv2d(channels[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            x = merge(torch.cat([up(x), skips.pop()], 1))
        return self.out(x)


def work_size(shape: tuple[int, int], spacing_mm: float | tuple[float, float]) -> tuple[int, int]:
    """The work grid's in-plane size for a slice of ``shape`` pixels of ``spacing_mm`` (one value:
    square pixels)."""
    di, dj = (spacing_mm, spacing_mm) if isinstance(spacing_mm, float | int) else spacing_mm
    return (max(2, round(shape[0] * di / WORK_MM)), max(2, round(shape[1] * dj / WORK_MM)))


def to_work(slices: np.ndarray, spacing_mm: float | tuple[float, float]) -> torch.Tensor:
    """Axial slices [h, w, C] (float) area-averaged onto the work grid: [C, 1, h', w']."""
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(slices, 2, 0), np.float32))[:, None]
    return F.interpolate(t, size=work_size(slices.shape[:2], spacing_mm), mode="area")


def net_inputs(hu_work: torch.Tensor, metal_work: torch.Tensor) -> torch.Tensor:
    """The network's two channels [C, 2, h', w'] from the work grid's CT number and metal share."""
    return torch.cat([hu_work.clamp(-1000.0, 3071.0) / 1000.0, metal_work], 1)


def _padded(x: torch.Tensor) -> torch.Tensor:
    m = 2 ** DEPTH
    return F.pad(x, (0, (-x.shape[-1]) % m, 0, (-x.shape[-2]) % m))


@torch.no_grad()
def predict_streak(net: StreakResidualNet, hu: np.ndarray, spacing_mm: float | tuple[float, float],
                   ) -> np.ndarray:
    """The streak (HU) the network sees in slices ``hu`` [h, w, C], on their own grid (float32)."""
    metal = (hu > METAL_HU).astype(np.float32)
    size = work_size(hu.shape[:2], spacing_mm)
    x = _padded(net_inputs(to_work(hu.astype(np.float32), spacing_mm), to_work(metal, spacing_mm)))
    r = net(x)[..., :size[0], :size[1]] * HU_SCALE
    fine = F.interpolate(r, size=hu.shape[:2], mode="bilinear", align_corners=False)
    return np.moveaxis(fine[:, 0].numpy(), 0, 2)


def correct_streaks(ct: Volume, net: StreakResidualNet, batch: int = 16) -> Volume:
    """``ct`` (after LI) with the predicted streak subtracted in the slices holding metal, outside the
    metal and the air, within :data:`REACH_MM` of the metal's in-plane box (where LI corrects too,
    and the muscles beside the implant lie); the same object when no slice holds metal."""
    hu = np.asarray(ct.array)
    ks = np.flatnonzero(slices_with_metal(hu))
    if ks.size == 0:
        return ct
    di, dj = ct.spacing_mm[:2]
    box = metal_reach_box(hu[:, :, ks] > METAL_HU, REACH_MM, (di, dj))
    out = hu.copy()
    for b0 in range(0, ks.size, batch):
        k = ks[b0:b0 + batch]
        s = hu[box[0], box[1], k].astype(np.float32)
        fixed = np.where((s > METAL_HU) | (s <= AIR_HU), s, s - predict_streak(net, s, (di, dj)))
        out[box[0], box[1], k] = stored_as(fixed, out.dtype)
    return ct.with_array(out)


def load_streak_net(path: str) -> StreakResidualNet:
    """The network of a safetensors file ``scripts/train_streak_net.py`` wrote, ready to predict."""
    from safetensors.torch import load_file

    net = StreakResidualNet()
    net.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return net.eval()
