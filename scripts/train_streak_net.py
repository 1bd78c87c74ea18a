"""Train :class:`seg.streak_net.StreakResidualNet` on pairs the phantom makes (a probe's training).

Each post-operative phantom of the plan (``--phantoms`` from ``--seed-start``, three in four
post-operative) is rendered as it is and with its streak error switched off
(:func:`benchmarks.streak_oracle.streak_free`); its slices holding metal, after the LI reduction and
streak-free, are area-averaged onto the work grid and cached (one ``.npz`` per seed in ``--cache``,
reused). The network learns the difference (the streak LI left) on random 96² crops, loss on the body
outside the metal, AdamW with a cosine decay over ``--minutes``; the weights go to ``--out``
(safetensors, float16). Use seeds no held-out or analysis figure uses (8500 on here):

    PYTHONPATH=$PWD .venv/bin/python scripts/train_streak_net.py --phantoms 96 --seed-start 8500 \\
        --cache checkpoints/streak/cache --minutes 30 --out checkpoints/streak/streak.safetensors
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from seg.streak_net import HU_SCALE, StreakResidualNet, net_inputs, to_work

CROP = 96


def cache_pairs(seeds_from: int, n: int, cache: Path) -> list[Path]:
    """The cached work-grid pairs of the plan's post-operative phantoms (rendered where missing)."""
    from benchmarks.streak_oracle import streak_free
    from seg.mar import reduce_metal_artefacts
    from seg.metal_proximity import METAL_HU, slices_with_metal
    from seg.train import phantom_plan, plan_phantom

    cache.mkdir(parents=True, exist_ok=True)
    files = []
    for o in phantom_plan(n, seeds_from, postop_share=0.75):
        if not (o.postop and o.implant_side):
            continue
        path = cache / f"{o.seed}.npz"
        if not path.is_file():
            post = plan_phantom(o, None)
            ks = slices_with_metal(post.ct.array)
            x = np.asarray(reduce_metal_artefacts(post.ct).array, np.float32)[:, :, ks]
            y = np.asarray(streak_free(o).ct.array, np.float32)[:, :, ks]
            sp = float(post.ct.spacing_mm[0])
            tmp = path.with_suffix(".tmp.npz")
            metal = (x > METAL_HU).astype(np.float32)
            np.savez_compressed(tmp, **{k: to_work(v, sp).numpy().astype(np.float16)
                                        for k, v in (("x", x), ("y", y), ("metal", metal))})
            tmp.replace(path)
            print(f"seed {o.seed}: {int(ks.sum())} slices with metal", flush=True)
        files.append(path)
    return files


def training_slices(files: list[Path]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(inputs [2, h, w], target streak [1, h, w] / HU_SCALE, loss mask [1, h, w]) per cached slice."""
    out = []
    for f in files:
        z = np.load(f)
        x, y, m = (torch.from_numpy(z[k].astype(np.float32)) for k in ("x", "y", "metal"))
        inp = net_inputs(x, m).numpy()
        target = ((x - y) / HU_SCALE).numpy()
        mask = ((y > -500) & (m < 0.01)).numpy().astype(np.float32)
        out += [(inp[i], target[i], mask[i]) for i in range(inp.shape[0])]
    return out


def _crop(a: np.ndarray, i0: int, j0: int) -> np.ndarray:
    h, w = a.shape[-2:]
    a = np.pad(a, [(0, 0), (0, max(0, CROP - h)), (0, max(0, CROP - w))])
    return a[:, i0:i0 + CROP, j0:j0 + CROP]


def batch_of(data: list, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, ...]:
    """Random crops of random slices: inputs, targets and masks as tensors."""
    picked = []
    for idx in rng.integers(0, len(data), size):
        inp, target, mask = data[idx]
        h, w = target.shape[-2:]
        i0, j0 = int(rng.integers(0, max(1, h - CROP + 1))), int(rng.integers(0, max(1, w - CROP + 1)))
        picked.append([_crop(a, i0, j0) for a in (inp, target, mask)])
    return tuple(torch.from_numpy(np.stack(v)) for v in zip(*picked, strict=True))


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (((pred.float() - target) ** 2) * mask).sum() / mask.sum().clamp(min=1.0)


def train(data: list, minutes: float, lr: float = 1e-3, batch: int = 16, seed: int = 0,
          log_every: int = 100, max_steps: int | None = None) -> tuple[StreakResidualNet, int]:
    """The network after ``minutes`` of training, or ``max_steps`` if sooner (bf16 autocast on CPU
    where the hardware has it); the rate decays over whichever ends it."""
    from seg.runtime import cpu_has_bf16

    torch.manual_seed(seed)
    net = StreakResidualNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    bf16 = cpu_has_bf16()
    t0, step, recent = time.monotonic(), 0, []
    def done() -> float:
        return max((time.monotonic() - t0) / (minutes * 60), step / max_steps if max_steps else 0.0)

    while (progress := done()) < 1.0:
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * progress))
        x, y, m = batch_of(data, rng, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = net(x)
        loss = masked_mse(pred, y, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent.append(float(loss.detach()))
        step += 1
        if step % log_every == 0:
            rms = HU_SCALE * math.sqrt(float(np.mean(recent[-log_every:])))
            print(f"step {step} {(time.monotonic() - t0) / 60:.1f} min: streak left {rms:.1f} HU RMS",
                  flush=True)
    return net.eval(), step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phantoms", type=int, default=96, help="plan length (default: %(default)s)")
    ap.add_argument("--seed-start", type=int, default=8500, help="first seed (default: %(default)s)")
    ap.add_argument("--cache", type=Path, required=True, help="folder of the cached pairs")
    ap.add_argument("--minutes", type=float, default=30.0, help="training time (default: %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    ap.add_argument("--package", type=Path, default=None, help="a model package (trained with --mar li) "
                    "to give the correction to: its preprocessing then asks for 'li+learned'")
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    data = training_slices(cache_pairs(args.seed_start, args.phantoms, args.cache))
    print(f"{len(data)} slices with metal", flush=True)
    net, steps = train(data, args.minutes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    made = {"steps": steps, "phantoms": args.phantoms, "seed_start": args.seed_start}
    # float16, as the package's network: half the size, and the correction is a few HU either way
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(args.out),
              metadata={k: str(v) for k, v in made.items()})
    print(f"{steps} steps -> {args.out}")
    if args.package is not None:
        from seg.package import attach_streak_correction

        attach_streak_correction(args.package, args.out)
        print(f"{args.package}: preprocessing li+learned")


if __name__ == "__main__":
    main()
