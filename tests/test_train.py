"""A short training run produces a loadable package and resumes from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seg.model import load_model
from seg.train import CropSampler, TrainConfig, train

ARCH = {"in_channels": 1, "out_channels": 30, "img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 48,
        "mlp_dim": 96, "num_heads": 4, "proj_type": "conv", "norm_name": "instance", "res_block": True,
        "dropout_rate": 0.0}


def _cfg(tmp: Path, steps: int) -> TrainConfig:
    return TrainConfig(out=str(tmp / "pkg"), checkpoint_dir=str(tmp / "ck"), phantoms=2, seed_start=70000,
                       val_phantoms=1, phantom_z_range_mm=(-30.0, 30.0), arch=dict(ARCH), steps=steps,
                       val_every=2, batch_size=1, threads=1, name="tiny", version="0.0.1", demo=True)


@pytest.mark.slow
def test_short_training_run_exports_and_resumes(tmp_path: Path) -> None:
    pkg_dir = train(_cfg(tmp_path, 3), progress=False)
    pkg = load_model(pkg_dir, device="cpu")
    prov = pkg.meta["provenance"]
    assert prov["steps"] in (2, 3) and prov["trained_on"]["train_seeds"] == [70000, 70001]
    assert prov["trained_on"]["val_seeds"] == [70002] and prov["train_wall_s"] > 0
    assert pkg.info["demo"] is True
    ck = torch.load(tmp_path / "ck" / "last.pt", weights_only=False)
    assert ck["step"] == 3
    before = {k: v.clone() for k, v in ck["model"].items()}
    # resume: continues at step 3 (cache reused), ends at 5 with changed weights
    train(_cfg(tmp_path, 5), resume=True, progress=False)
    ck2 = torch.load(tmp_path / "ck" / "last.pt", weights_only=False)
    assert ck2["step"] == 5
    assert [h["step"] for h in ck2["history"]] == [2, 3, 4, 5]
    assert any(not torch.equal(before[k], ck2["model"][k]) for k in before)
    assert len(list((tmp_path / "ck" / "cache").glob("*_image.npy"))) == 3
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["steps"] == 5
    # warm start: a fresh run (no checkpoints) initialised from the package begins with its weights
    warm = _cfg(tmp_path / "warm", 0)
    warm.cache_dir, warm.init_from = str(tmp_path / "ck" / "cache"), str(pkg_dir)
    start = load_model(train(warm, progress=False), device="cpu").network.state_dict()
    resumed = load_model(pkg_dir, device="cpu").network.state_dict()  # the resumed run re-exported it
    assert all(torch.equal(v, start[k]) for k, v in resumed.items())
    wrong = _cfg(tmp_path / "wrong", 0)
    wrong.init_from, wrong.arch = str(pkg_dir), {**ARCH, "hidden_size": 96}
    with pytest.raises(ValueError, match="hidden_size"):
        train(wrong, progress=False)


def test_crop_sampler_shapes_and_padding(tmp_path: Path) -> None:
    img = np.random.default_rng(0).random((20, 40, 50)).astype(np.float16)
    lab = np.zeros((20, 40, 50), np.uint8)
    lab[5:10, 10:20, 10:30] = 7
    np.save(tmp_path / "a_image.npy", img)
    np.save(tmp_path / "a_labels.npy", lab)
    s = CropSampler([{"image": str(tmp_path / "a_image.npy"), "labels": str(tmp_path / "a_labels.npy")}],
                    (32, 32, 32), 1.0, True, np.random.default_rng(1))
    x, y = s.batch(3)
    assert x.shape == (3, 1, 32, 32, 32) and y.shape == (3, 1, 32, 32, 32)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert (y == 7).any()  # foreground-centred crops hit the label
