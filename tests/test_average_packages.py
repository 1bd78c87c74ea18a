"""Averaging packages' weights: the mean itself, what the new model.json says, refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seg.average import average_packages
from seg.model import build_network, load_model, save_package
from seg.package import Architecture, ModelPackageError, read_meta
from seg.preprocess_config import PreprocessConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = {"in_channels": 1, "out_channels": 30, "img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 48,
        "mlp_dim": 96, "num_heads": 4, "proj_type": "conv", "norm_name": "instance", "res_block": True,
        "dropout_rate": 0.0}


def _package(path: Path, seed: int, version: str, spacing: float = 3.0) -> Path:
    torch.manual_seed(seed)
    net = build_network(Architecture(args=TINY))
    return save_package(path, net, name="unit-test", version=version, arch_args=TINY,
                        preprocess=PreprocessConfig(spacing_mm=(spacing,) * 3), roi_size=(32, 32, 32),
                        demo=True, provenance={"note": f"random weights {seed}", "steps": seed})


def test_the_weights_are_the_mean_of_the_parts(tmp_path: Path) -> None:
    parts = [_package(tmp_path / f"p{i}", seed=i, version=f"0.{i}") for i in range(3)]
    out = average_packages(parts, tmp_path / "mean", version="1.0")
    states = [load_file(str(p / "model.safetensors")) for p in parts]
    mean = load_file(str(out / "model.safetensors"))
    assert set(mean) == set(states[0])
    for key, tensor in mean.items():
        expected = sum(s[key].float() for s in states) / 3
        assert torch.allclose(tensor.float(), expected, rtol=2e-3, atol=1e-4), key
    # not simply one of the parts
    key = "out.conv.conv.weight"
    assert all(not torch.equal(mean[key], s[key]) for s in states)
    assert load_model(out, device="cpu").meta.version == "1.0"


def test_model_json_is_the_last_parts_with_a_note_and_the_parts_named(tmp_path: Path) -> None:
    a = _package(tmp_path / "a", seed=1, version="0.1")
    b = _package(tmp_path / "b", seed=2, version="0.2")
    meta = read_meta(average_packages([a, b], tmp_path / "mean", version="0.3"))
    assert meta.version == "0.3"
    assert meta.provenance["steps"] == 2  # the last part's provenance
    assert meta.provenance["note"] == f"0.3: tensor-wise mean of the weights of {a} (0.1), {b} (0.2)"
    assert [p["version"] for p in meta.provenance["averaged_from"]] == ["0.1", "0.2"]
    assert meta.provenance["averaged_from"][0]["sha256"] == read_meta(a).weights.sha256
    assert meta.preprocessing == read_meta(b).preprocessing


def test_packages_that_read_different_input_are_refused(tmp_path: Path) -> None:
    a = _package(tmp_path / "a", seed=1, version="0.1", spacing=3.0)
    b = _package(tmp_path / "b", seed=2, version="0.2", spacing=4.0)
    with pytest.raises(ModelPackageError, match="preprocessing differ"):
        average_packages([a, b], tmp_path / "mean", version="0.3")
    assert not (tmp_path / "mean").exists()


def test_the_script_needs_two_packages_and_writes_one(tmp_path: Path) -> None:
    a = _package(tmp_path / "a", seed=1, version="0.1")
    b = _package(tmp_path / "b", seed=2, version="0.2")
    script = str(ROOT / "scripts" / "average_packages.py")
    one = subprocess.run([sys.executable, script, "--out", str(tmp_path / "x"), "--version", "1", str(a)],
                         capture_output=True, text=True)
    assert one.returncode == 2 and "at least two" in one.stderr
    two = subprocess.run([sys.executable, script, "--out", str(tmp_path / "m"), "--version", "1",
                          str(a), str(b)], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert read_meta(tmp_path / "m").version == "1"
