"""A package with the learned streak correction (preprocessing "li+learned", streak.safetensors):
written, verified, loaded, applied after LI, averaged; refused where it does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from seg.average import average_packages
from seg.mar import as_configured, reduce_metal_artefacts
from seg.model import build_network, load_model, save_package
from seg.package import STREAK_FILE, Architecture, ModelPackageError, attach_streak_correction, read_meta
from seg.preprocess_config import PreprocessConfig
from seg.streak_net import HU_SCALE, StreakResidualNet, correct_streaks
from seg.train import TrainConfig
from seg.volume import Volume

TINY = {"in_channels": 1, "out_channels": 30, "img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 48,
        "mlp_dim": 96, "num_heads": 4, "proj_type": "conv", "norm_name": "instance", "res_block": True,
        "dropout_rate": 0.0}


def _package(path: Path, mar: str = "li", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_package(path, build_network(Architecture(args=TINY)), name="unit-test", version="0.1",
                        arch_args=TINY, preprocess=PreprocessConfig(metal_artefact_reduction=mar),
                        roi_size=(32, 32, 32), demo=True, provenance={})


def _streak_file(path: Path, hu: float) -> Path:
    """Weights of a correction that predicts ``hu`` of streak everywhere."""
    net = StreakResidualNet()
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.fill_(hu / HU_SCALE)
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _ct() -> Volume:
    hu = np.full((40, 30, 4), 40, np.int16)
    hu[18:21, 14:16, 1:3] = 3071
    return Volume(hu, np.diag([1.5, 1.5, 3.0, 1.0]))


def test_attached_correction_is_verified_loaded_and_applied_after_li(tmp_path: Path) -> None:
    pkg = _package(tmp_path / "p")
    meta = attach_streak_correction(pkg, _streak_file(tmp_path / "s.safetensors", 20.0))
    assert meta.preprocessing.metal_artefact_reduction == "li+learned"
    written = json.loads((pkg / "model.json").read_text())
    assert written["streak_correction"]["file"] == STREAK_FILE
    assert list(written).index("streak_correction") == list(written).index("weights") + 1
    model = load_model(pkg, device="cpu")
    assert model.streak_net is not None and model.info.metal_artefact_reduction == "li+learned"
    ct = _ct()
    out = as_configured(ct, model.preprocess.metal_artefact_reduction, model.streak_net)
    expected = correct_streaks(reduce_metal_artefacts(ct), model.streak_net)
    assert np.array_equal(np.asarray(out.array), np.asarray(expected.array))
    assert not np.array_equal(np.asarray(out.array), np.asarray(reduce_metal_artefacts(ct).array))
    with pytest.raises(ValueError, match="needs the package's streak correction"):
        as_configured(ct, "li+learned")


def test_a_changed_or_missing_correction_file_is_refused(tmp_path: Path) -> None:
    pkg = _package(tmp_path / "p")
    attach_streak_correction(pkg, _streak_file(tmp_path / "s.safetensors", 20.0))
    _streak_file(pkg / STREAK_FILE, 30.0)  # other weights under the same name
    with pytest.raises(ModelPackageError, match="checksum mismatch"):
        load_model(pkg, device="cpu")
    (pkg / STREAK_FILE).unlink()
    with pytest.raises(ModelPackageError, match="streak correction file streak.safetensors is missing"):
        load_model(pkg, device="cpu")


def test_li_learned_and_the_correction_go_together(tmp_path: Path) -> None:
    pkg = _package(tmp_path / "p")
    raw = json.loads((pkg / "model.json").read_text())
    raw["preprocessing"]["metal_artefact_reduction"] = "li+learned"  # asked for, not given
    (pkg / "model.json").write_text(json.dumps(raw))
    with pytest.raises(ModelPackageError, match="go together"):
        read_meta(pkg)
    plain = _package(tmp_path / "q", mar="none")
    with pytest.raises(ModelPackageError, match="trained without metal artefact reduction"):
        attach_streak_correction(plain, _streak_file(tmp_path / "s.safetensors", 20.0))
    with pytest.raises(ValidationError):
        TrainConfig(metal_artefact_reduction="li+learned")  # a run caches with LI; the package adds it


def test_averaged_packages_keep_their_one_correction(tmp_path: Path) -> None:
    streak = _streak_file(tmp_path / "s.safetensors", 20.0)
    a, b = _package(tmp_path / "a", seed=1), _package(tmp_path / "b", seed=2)
    for p in (a, b):
        attach_streak_correction(p, streak)
    mean = read_meta(average_packages([a, b], tmp_path / "mean", version="0.2"))
    assert mean.preprocessing.metal_artefact_reduction == "li+learned"
    assert mean.streak_correction == read_meta(a).streak_correction
    c = _package(tmp_path / "c", seed=3)
    attach_streak_correction(c, _streak_file(tmp_path / "t.safetensors", 30.0))
    with pytest.raises(ModelPackageError, match="streak correction differ"):
        average_packages([a, c], tmp_path / "mean2", version="0.2")
