"""scripts/gpu_leg.py: GPU-resident crops follow seg.train's sampler; a leg exports as a package."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seg import labels as L
from seg.model import load_model
from seg.package import DEMO_DIR
from seg.phantom import PhantomOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_leg():
    spec = importlib.util.spec_from_file_location("gpu_leg", ROOT / "scripts" / "gpu_leg.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _case(shape: tuple[int, int, int], value: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.full(shape, value, np.float16)
    labels = np.zeros(shape, np.uint8)
    labels[2:-2, 3:-3, 4:-4] = L.LABEL_OF["sartorius"]
    fractions = np.zeros((L.NUM_CLASSES, *shape), np.uint8)
    np.put_along_axis(fractions, labels[None].astype(np.int64), 255, axis=0)
    return image, labels, fractions


def test_crops_are_padded_partial_volume_targets(gpu_leg) -> None:
    cases = gpu_leg.GpuCases(24, torch.device("cpu"), 1.0, 1.0, np.random.default_rng(0))
    cases.add(PhantomOptions(seed=1), *_case((20, 30, 40), 0.5))  # x shorter than the ROI: padded
    x, y = cases.batch(6)
    assert x.shape == (6, 1, 24, 24, 24) and y.shape == (6, L.NUM_CLASSES, 24, 24, 24)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.allclose(y.sum(1), torch.ones(6, 24, 24, 24))  # padding is background
    for xi, yi in zip(x[:, 0], y[:, 0], strict=True):  # the padded slab, at either end (mirrored crops)
        pad = slice(20, None) if bool((yi[20:] == 1).all()) else slice(0, 4)
        assert bool((yi[pad] == 1).all()) and bool((xi[pad] < 0.2).all())
    assert float(y[:, L.LABEL_OF["sartorius"]].sum()) > 0  # centred on labelled voxels


def test_postop_cases_are_drawn_by_their_weight(gpu_leg) -> None:
    cases = gpu_leg.GpuCases(16, torch.device("cpu"), 0.85, 3.0, np.random.default_rng(1))
    cases.add(PhantomOptions(seed=1), *_case((24, 24, 24), 0.2))
    cases.add(PhantomOptions(seed=2, postop=True), *_case((24, 24, 24), 0.8))
    x, _ = cases.batch(300)
    share = float((x.mean((1, 2, 3, 4)) > 0.5).float().mean())
    assert 0.68 < share < 0.82  # 3 / (3 + 1)


def test_a_leg_exports_as_a_package(gpu_leg, tmp_path: Path) -> None:
    base = load_model(DEMO_DIR, device="cpu")
    leg = tmp_path / "leg"
    leg.mkdir()
    gpu_leg.save_split(base.network.state_dict(), leg, "best", torch.float32)
    assert len(list(leg.glob("best_*.safetensors"))) > 1  # chunks under the device tool's file limit
    args = {"batch": 16, "lr": 5e-4, "warmup": 150, "decay_start": 0.4, "postop_weight": 2.0,
            "val_phantoms": 4, "extra": 8, "extra_start": 2000, "workers": 14, "seed": 0, "mar": "li",
            "loss": "dicefocal"}
    meta = {"args": args, "hardware": "NVIDIA H200, test", "torch": "2.11.0", "step": 120,
            "train_wall_s": 30.0, "best": 0.9, "best_step": 100, "val": None,
            "history": [{"step": 100, "elapsed_s": 25.0, "val_mean_dice_muscles": 0.9}],
            "train_seeds": [1000, 2000], "val_seeds": [1384, 1385, 1386, 1387]}
    (leg / "meta.json").write_text(json.dumps(meta))
    out = gpu_leg.export_leg(leg, tmp_path / "pkg", str(DEMO_DIR), "9.9.9", "leg 99 (H200)")
    pkg = load_model(out, device="cpu")
    prov = pkg.meta.provenance
    prior = len(base.meta.provenance["campaign"]["legs"])
    assert pkg.meta.version == "9.9.9" and prov["exported_step"] == 100
    assert len(prov["campaign"]["legs"]) == prior + 1
    assert prov["campaign"]["legs"][-1] == {"steps": 120, "wall_s": 30.0, "hardware": "NVIDIA H200, test",
                                           "init_from": str(DEMO_DIR), "name": "leg 99 (H200)",
                                           "history": meta["history"]}
    assert prov["trained_on"]["train_seeds"] == [1000, 2000] and prov["config"]["batch_size"] == 16
    assert prov["config"]["loss"] == "dicefocal"
    # the leg validates by wall time; the record counts the steps between validations
    assert prov["config"]["val_every"] == 100
    assert gpu_leg.steps_between_validations([{"step": s} for s in (100, 180, 260, 300)]) == 80
    assert pkg.preprocess.metal_artefact_reduction == "li"  # trained on corrected CTs: inference too
    for k, v in base.network.state_dict().items():
        assert torch.equal(pkg.network.state_dict()[k], v), k


def test_a_leg_refuses_seeds_kept_out_of_training(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_leg.py"), "--out", str(tmp_path),
                        "--extra", "1200", "--extra-start", "4300"], capture_output=True, text=True)
    assert r.returncode == 2 and "overlaps seeds 5000-5099" in r.stderr
    assert not list(tmp_path.iterdir())
    # a training setting TrainConfig refuses stops the leg before a phantom is made, not after
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_leg.py"), "--out", str(tmp_path),
                        "--lr=-5e-4", "--decay-start", "1.4"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "--lr must be positive and finite; --decay-start must be between 0 and 1" in r.stderr
    assert not list(tmp_path.iterdir())


def test_the_logged_loss_is_the_mean_of_those_read(gpu_leg) -> None:
    nan = float("nan")
    assert gpu_leg.mean_loss([nan, 0.4, nan, 0.2]) == 0.3
    assert gpu_leg.mean_loss([nan, nan]) is None  # valid JSON before the first read, not NaN


def test_gpu_crops_are_the_cpu_samplers_crops(gpu_leg, tmp_path: Path) -> None:
    """Same seed, same case: the first crop's target is the one seg.train.CropSampler cuts, and its
    image differs by the jitter's noise alone, with metal streaks drawn over it or without."""
    from seg.train import CropSampler, TrainConfig, preprocess_config

    image, labels, fractions = _case((30, 40, 50), 0.5)
    image = np.random.default_rng(2).random(image.shape).astype(np.float16) * 0.5 + 0.25
    for name, a in (("image", image), ("labels", labels), ("fractions", fractions)):
        np.save(tmp_path / f"c_{name}.npy", a)
    case = {k: str(tmp_path / f"c_{k}.npy") for k in ("image", "labels", "fractions")}
    pre = preprocess_config(TrainConfig(spacing_mm=gpu_leg.SPACING))
    for seed, streaks in ((0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0)):
        cpu = CropSampler([case], (24, 24, 24), 0.85, True, np.random.default_rng(seed), fractions=True,
                          streak_prob=streaks, pre=pre)
        gpu = gpu_leg.GpuCases(24, torch.device("cpu"), 0.85, 1.0, np.random.default_rng(seed), streaks)
        gpu.add(PhantomOptions(seed=1), image, labels, fractions)
        (xc, yc), (xg, yg) = cpu.batch(1), gpu.batch(1)
        assert torch.equal(yc, yg)
        assert float((xc - xg).abs().mean()) < 0.05

