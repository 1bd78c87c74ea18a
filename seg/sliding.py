"""Sliding-window inference that computes every window once, in bounded memory.

MONAI's ``sliding_window_inference`` stitches into an output the size of the whole volume
(C × X × Y × Z float32, plus a weight map); running it slab by slab bounds that memory but
recomputes the windows at every slab border. Here the windows of the same grid (MONAI's window
starts, its centred zero padding of axes shorter than the ROI, its importance map) are visited with
the last axis slowest. Each window's weighted output is added once into a ring of at most ROI-depth
slices; slices that no later window can reach are normalised, handed to a sink and their slots
reused. Memory: one band of ``C × X × Y × roi_z`` float32, whatever the series length.

The sums run in a different order than MONAI's (which goes first axis slowest), so the stitched
logits agree with MONAI's to float32 rounding and the argmax agrees except at ties within it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

Predictor = Callable[[torch.Tensor], torch.Tensor]
# (first slice, end slice, normalised logits (C, X, Y, end - first) float32), in increasing slice order;
# the logits are a view of a contiguous (C, X, end - first, Y) tensor (``.transpose(-1, -2)`` gives it).
Sink = Callable[[int, int, torch.Tensor], None]


def axis_starts(size: int, roi: int, overlap: float) -> tuple[int, ...]:
    """Window starts along one axis of a (padded) axis of ``size`` ≥ ``roi`` voxels.

    MONAI's rule: step ``int(roi × (1 − overlap))`` (at least 1; one window when the axis equals the
    ROI), as many steps as reach the end, the last start pulled back so the window ends at the edge.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size < roi:
        raise ValueError(f"axis of {size} voxels is shorter than the ROI ({roi}); pad it first")
    step = roi if size == roi else max(1, int(roi * (1.0 - overlap)))
    starts = [0]
    while starts[-1] + roi < size:
        starts.append(min(starts[-1] + step, size - roi))
    return tuple(starts)


@dataclass(frozen=True)
class WindowGrid:
    """The windows covering an image: starts per axis, in the padded frame MONAI uses."""

    shape: tuple[int, int, int]  # the image
    roi: tuple[int, int, int]
    pad_before: tuple[int, int, int]  # zero padding before each axis shorter than the ROI
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # padded coordinates

    def __len__(self) -> int:
        return int(np.prod([len(s) for s in self.starts]))

    def windows(self) -> Iterator[tuple[int, int, int]]:
        """Window starts (padded x, y, z) with z slowest, then x, then y."""
        for z in self.starts[2]:
            for x, y in itertools.product(self.starts[0], self.starts[1]):
                yield x, y, z

    def clip(self, start: int, axis: int) -> tuple[int, int, int]:
        """Image range [a, b) a window starting at ``start`` covers on ``axis``, and the offset of a in
        the window (padding is cut away)."""
        a = start - self.pad_before[axis]
        lo, hi = max(a, 0), min(a + self.roi[axis], self.shape[axis])
        return lo, hi, lo - a


def window_grid(shape: Sequence[int], roi: Sequence[int], overlap: float) -> WindowGrid:
    """The sliding-window grid of MONAI's ``sliding_window_inference`` for ``shape`` and ``roi``."""
    shape3 = tuple(int(v) for v in shape)
    roi3 = tuple(int(v) for v in roi)
    if len(shape3) != 3 or len(roi3) != 3:
        raise ValueError("3-D image and ROI expected")
    padded = tuple(max(n, r) for n, r in zip(shape3, roi3, strict=True))
    pad = tuple((p - n) // 2 for p, n in zip(padded, shape3, strict=True))
    starts = tuple(axis_starts(p, r, overlap) for p, r in zip(padded, roi3, strict=True))
    return WindowGrid(shape3, roi3, pad, starts)  # type: ignore[arg-type]


@dataclass
class StreamStats:
    """What a streamed run did: its window count is the grid's, its band never outgrows ``depth``."""

    windows: int = 0
    batches: int = 0
    depth: int = 0  # slices the ring holds
    max_open_slices: int = 0  # most slices open (added to, not yet released) at any moment
    releases: list[tuple[int, int]] = field(default_factory=list)  # (first, end) handed to the sink


class BandAccumulator:
    """Weighted sums of window outputs over a ring of ``depth`` slices of the image's (X, Y) plane.

    Slices open in order: ``add`` may touch slices from ``lo`` up to ``lo + depth``; ``release(upto)``
    normalises slices ``lo .. upto`` by their weight sum, yields them and frees their slots. Held as
    (C, X, slice, Y): a released piece is one contiguous run per (class, row), so normalising, zeroing
    and storing it is 3-4x faster than with slices innermost (the window adds pay a 96 x 96 transpose).
    """

    def __init__(self, channels: int, plane: tuple[int, int], depth: int, device: torch.device,
                 stats: StreamStats) -> None:
        self.acc = torch.zeros((channels, plane[0], depth, plane[1]), dtype=torch.float32, device=device)
        self.wsum = torch.zeros((plane[0], depth, plane[1]), dtype=torch.float32, device=device)
        self.depth, self.lo, self.hi = depth, 0, 0
        self.stats = stats
        stats.depth = depth

    def add(self, weighted: torch.Tensor, weight: torch.Tensor, xs: slice, ys: slice, z0: int) -> None:
        """Add a window's weighted output (C, x, y, z) and its weight (x, y, z) at slices ``z0 .. z0 + z``."""
        z1 = z0 + weighted.shape[-1]
        if z0 < self.lo or z1 > self.lo + self.depth:
            raise RuntimeError(f"window slices {z0}..{z1} outside the band {self.lo}..{self.lo + self.depth}")
        self.hi = max(self.hi, z1)
        self.stats.max_open_slices = max(self.stats.max_open_slices, self.hi - self.lo)
        for r0, r1, w0 in self._pieces(z0, z1):
            self.acc[:, xs, r0:r1, ys].add_(weighted[..., w0 : w0 + r1 - r0].transpose(-1, -2))
            self.wsum[xs, r0:r1, ys].add_(weight[..., w0 : w0 + r1 - r0].transpose(-1, -2))

    def release(self, upto: int, chunk: int = 8) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Normalised slices ``lo .. upto`` as (C, X, Y, k) views (Y fastest in memory), at most ``chunk``
        at a time; their slots are zeroed."""
        if upto > self.hi:
            raise RuntimeError(f"slices up to {upto} released but only {self.hi} were reached")
        while self.lo < upto:
            z0 = self.lo
            r0 = z0 % self.depth
            z1 = min(upto, z0 + chunk, z0 + self.depth - r0)  # a piece never wraps the ring
            r1 = r0 + z1 - z0
            out = (self.acc[:, :, r0:r1] / self.wsum[:, r0:r1]).transpose(-1, -2)
            self.acc[:, :, r0:r1].zero_()
            self.wsum[:, r0:r1].zero_()
            self.lo = z1
            self.stats.releases.append((z0, z1))
            yield z0, z1, out

    def _pieces(self, z0: int, z1: int) -> Iterator[tuple[int, int, int]]:
        """(ring start, ring end, offset in the window) for slices z0..z1, split where the ring wraps."""
        z = z0
        while z < z1:
            r0 = z % self.depth
            n = min(z1 - z, self.depth - r0)
            yield r0, r0 + n, z - z0
            z += n


def _window_input(image: np.ndarray, grid: WindowGrid, start: tuple[int, int, int]) -> np.ndarray:
    """The window's input (float32, ROI-sized), zero where it reaches into the padding."""
    (x0, x1, ox), (y0, y1, oy), (z0, z1, oz) = (grid.clip(s, a) for a, s in enumerate(start))
    part = image[x0:x1, y0:y1, z0:z1]
    if part.shape == grid.roi:
        return np.asarray(part, dtype=np.float32)
    win = np.zeros(grid.roi, dtype=np.float32)
    win[ox : ox + x1 - x0, oy : oy + y1 - y0, oz : oz + z1 - z0] = part
    return win


def importance_map(roi: Sequence[int], mode: str, device: torch.device) -> torch.Tensor:
    """MONAI's window weighting ("gaussian": sigma 0.125 × ROI, clamped at 1e-3; "constant": ones)."""
    from monai.data.utils import compute_importance_map

    return compute_importance_map(tuple(roi), mode=mode, sigma_scale=0.125, device=device,
                                  dtype=torch.float32)


def _blend(band: BandAccumulator, grid: WindowGrid, out: torch.Tensor, batch: list[tuple[int, int, int]],
           weight: torch.Tensor, sink: Sink) -> None:
    """Add a batch's outputs (B, C, ROI) in window order, releasing the slices each window leaves behind."""
    for o, s in zip(out, batch, strict=True):
        (x0, x1, ox), (y0, y1, oy), (z0, z1, oz) = (grid.clip(v, a) for a, v in enumerate(s))
        for r in band.release(z0):
            sink(*r)
        cut = (slice(ox, ox + x1 - x0), slice(oy, oy + y1 - y0), slice(oz, oz + z1 - z0))
        w = weight[cut]
        band.add(o[(slice(None), *cut)].mul_(w), w, slice(x0, x1), slice(y0, y1), z0)


def stream_windows(
    image: np.ndarray,
    roi: Sequence[int],
    predictor: Predictor,
    sink: Sink,
    *,
    overlap: float = 0.25,
    mode: str = "gaussian",
    sw_batch: int = 1,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> StreamStats:
    """Run ``predictor`` once on every window of ``image`` (X, Y, Z) and stream the blended logits.

    Windows go to ``device`` ``sw_batch`` at a time; the band lives on the device of the predictor's
    output. ``sink`` gets every slice exactly once, in order, as soon as no later window reaches it.
    """
    grid = window_grid(image.shape, roi, overlap)
    device = torch.device(device)
    starts = list(grid.windows())
    stats = StreamStats()
    band: BandAccumulator | None = None
    weight: torch.Tensor | None = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(starts), desc="segment", unit="window")
    with torch.inference_mode():
        for b in range(0, len(starts), sw_batch):
            batch = starts[b : b + sw_batch]
            x = torch.from_numpy(np.stack([_window_input(image, grid, s) for s in batch]))[:, None]
            out = predictor(x.to(device)).float()
            del x
            stats.windows += len(batch)
            stats.batches += 1
            if band is None:
                weight = importance_map(grid.roi, mode, out.device)
                depth = min(grid.roi[2], grid.shape[2])
                band = BandAccumulator(out.shape[1], grid.shape[:2], depth, out.device, stats)
            assert weight is not None
            _blend(band, grid, out, batch, weight, sink)
            del out  # before the next forward: one window batch of outputs alive at a time
            if bar is not None:
                bar.update(len(batch))
        assert band is not None
        for r in band.release(grid.shape[2]):
            sink(*r)
    if bar is not None:
        bar.close()
    return stats
