"""Model packages: round trip, clear failures for corrupt or mismatched packages, paper-size UNETR."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from seg import labels as L
from seg.infer import predict_probabilities, segment
from seg.model import build_network, load_model, save_package
from seg.package import Architecture, InferenceOptions, ModelPackageError
from seg.preprocess_config import PreprocessConfig
from seg.recipe import PAPER_UNETR
from seg.volume import Volume

TINY = {"in_channels": 1, "out_channels": 30, "img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 48,
        "mlp_dim": 96, "num_heads": 4, "proj_type": "conv", "norm_name": "instance", "res_block": True,
        "dropout_rate": 0.0}


def _package(path: Path, arch: dict = TINY, spacing=(3.0, 3.0, 3.0),
             inference: InferenceOptions | None = None) -> Path:
    torch.manual_seed(0)
    net = build_network(Architecture(args=arch))
    return save_package(path, net, name="unit-test", version="9.9", arch_args=arch,
                        preprocess=PreprocessConfig(spacing_mm=spacing), roi_size=tuple(arch["img_size"]),
                        demo=True, provenance={"note": "random weights"}, inference=inference)


def _ct(shape=(30, 24, 12), spacing=3.0) -> Volume:
    arr = np.full(shape, -1000, np.int16)
    arr[5:25, 4:20, 1:11] = 50
    arr[12:16, 9:13, 1:11] = 1200
    return Volume(arr, np.diag([spacing, spacing, spacing, 1.0]))


@pytest.fixture(scope="module")
def pkg_dir(tmp_path_factory) -> Path:
    return _package(tmp_path_factory.mktemp("pkg") / "tiny")


def test_package_round_trip(pkg_dir: Path) -> None:
    meta = json.loads((pkg_dir / "model.json").read_text())
    assert meta["classes"] == list(L.CLASS_NAMES)
    assert meta["demo"] is True and "not for clinical measurement" in meta["statement"]
    assert meta["weights"]["dtype"] == "float16" and len(meta["weights"]["sha256"]) == 64
    pkg = load_model(pkg_dir, device="cpu")
    assert pkg.info.name == "unit-test" and pkg.info.demo is True
    assert pkg.info.spacing_mm == (3.0, 3.0, 3.0)
    ct = _ct()
    lab = segment(ct, pkg)
    assert lab.shape == ct.shape and lab.array.dtype == np.uint8 and np.allclose(lab.affine, ct.affine)
    assert lab.array.max() < L.NUM_CLASSES


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupt_weights_fail_with_checksum_message(pkg_dir: Path, tmp_path: Path) -> None:
    p = _copy(pkg_dir, tmp_path / "corrupt")
    w = p / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="checksum mismatch"):
        load_model(p)


def test_truncated_weights_with_matching_checksum_fail_clearly(pkg_dir: Path, tmp_path: Path) -> None:
    p = _copy(pkg_dir, tmp_path / "trunc")
    w = p / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    meta = json.loads((p / "model.json").read_text())
    from seg.package import sha256_file

    meta["weights"]["sha256"] = sha256_file(w)
    (p / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelPackageError, match="not a readable safetensors"):
        load_model(p)


def test_class_list_mismatch(pkg_dir: Path, tmp_path: Path) -> None:
    p = _copy(pkg_dir, tmp_path / "classes")
    meta = json.loads((p / "model.json").read_text())
    meta["classes"][3], meta["classes"][4] = meta["classes"][4], meta["classes"][3]
    (p / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelPackageError, match="class list .* does not match"):
        load_model(p)


def test_architecture_shape_mismatch(pkg_dir: Path, tmp_path: Path) -> None:
    p = _copy(pkg_dir, tmp_path / "shapes")
    meta = json.loads((p / "model.json").read_text())
    meta["architecture"]["args"]["hidden_size"] = 96
    meta["architecture"]["args"]["mlp_dim"] = 192
    (p / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelPackageError, match="tensor shapes do not fit"):
        load_model(p)


@pytest.mark.parametrize(("args", "said"), [
    ({"in_channels": 2}, "in_channels 2, but vit.patch_embedding.patch_embeddings.weight has 1"),
    ({"feature_size": 8}, "feature_size 8, but out.conv.conv.weight has 4"),
    ({"img_size": [64, 64, 64]}, "img_size [64, 64, 64]: patches 64, but "
                                 "vit.patch_embedding.position_embeddings has 8"),
])
def test_model_json_that_does_not_fit_its_weights_is_refused_without_torch(
        pkg_dir: Path, tmp_path: Path, args: dict, said: str) -> None:
    """An edited model.json (its checksum still matches the weights) is refused by the torch-free
    check that `config check` and `serve` run, from the safetensors header alone."""
    from seg.package import verify_package

    p = _copy(pkg_dir, tmp_path / "edited")
    meta = json.loads((p / "model.json").read_text())
    meta["architecture"]["args"].update(args)
    (p / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelPackageError, match="tensor shapes do not fit model.json") as err:
        verify_package(p)
    assert said in str(err.value)


def test_absurd_or_padded_weights_are_refused_before_hashing(pkg_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A weights file over the size limit is refused at once (never hashed); bytes after the last
    tensor (a file appended to, or another file's tail) make it unreadable, as safetensors says."""
    import seg.package as package

    p = _copy(pkg_dir, tmp_path / "big")
    size = (p / "model.safetensors").stat().st_size
    monkeypatch.setattr(package, "MAX_WEIGHTS_BYTES", size - 1)
    monkeypatch.setattr(package, "sha256_file", lambda _: pytest.fail("an absurd file was hashed"))
    with pytest.raises(ModelPackageError, match=r"over the 0 GiB a model package may hold"):
        package.verify_package(p)
    monkeypatch.undo()
    with (p / "model.safetensors").open("ab") as fh:
        fh.write(b"\0" * 16)
    with pytest.raises(ModelPackageError, match=f"tensors end at byte {size}, the file at {size + 16}"):
        package.verify_package(p)


def test_missing_files(tmp_path: Path, pkg_dir: Path) -> None:
    with pytest.raises(ModelPackageError, match="not a folder"):
        load_model(tmp_path / "nowhere")
    p = _copy(pkg_dir, tmp_path / "nojson")
    (p / "model.json").unlink()
    with pytest.raises(ModelPackageError, match="no model.json"):
        load_model(p)
    p = _copy(pkg_dir, tmp_path / "noweights")
    (p / "model.safetensors").unlink()
    with pytest.raises(ModelPackageError, match="weights file .* is missing"):
        load_model(p)


@pytest.mark.slow
def test_paper_size_unetr_package_loads_and_runs(tmp_path: Path) -> None:
    """The paper's UNETR (patch 16, hidden 768, 12 heads, MLP 3072, feature 16) as a site package."""
    arch = dict(PAPER_UNETR)
    p = _package(tmp_path / "paper", arch, spacing=(1.5, 1.5, 1.5))
    pkg = load_model(p, device="cpu")
    n = sum(t.numel() for t in pkg.network.parameters())
    assert n > 90e6  # ~92 M parameters
    args = pkg.meta.architecture.args
    got = (args["hidden_size"], args["num_heads"], args["mlp_dim"], args["feature_size"])
    assert got == (768, 12, 3072, 16)
    assert pkg.network.patch_size == (16, 16, 16) and len(pkg.network.vit.blocks) == 12
    ct = _ct(shape=(40, 36, 20), spacing=1.5)  # one 96^3 window after padding
    lab = segment(ct, pkg)
    assert lab.shape == ct.shape and lab.array.dtype == np.uint8


@pytest.mark.parametrize("mirror", [True, False])
def test_mirrored_inference_is_left_right_symmetric(tmp_path, mirror) -> None:
    """A package trained on mirrored crops asks for the mirror of each window too: the probabilities
    of a mirrored image are then the mirror of the image's (one window across x, so the grid is
    symmetric). A random network alone is not symmetric, which the unmirrored case shows."""
    pkg = load_model(_package(tmp_path / "m", inference=InferenceOptions(mirror_x=True) if mirror else None))
    assert pkg.inference.mirror_x is mirror
    rng = np.random.default_rng(0)
    image = rng.random((TINY["img_size"][0], 40, 36), dtype=np.float32)
    a = predict_probabilities(pkg, image).astype(np.int16)
    b = predict_probabilities(pkg, np.ascontiguousarray(image[::-1])).astype(np.int16)[:, ::-1]
    worst = int(np.abs(a - b).max())
    assert (worst <= 1) is mirror, worst


def test_model_json_names_every_missing_or_unknown_key(pkg_dir: Path, tmp_path: Path) -> None:
    """model.json is one record (seg.package.PackageMeta): a key it does not know, at the top or
    inside a part, and a key it needs are refused together, each by name, with the file's path."""
    p = _copy(pkg_dir, tmp_path / "keys")
    meta = json.loads((p / "model.json").read_text())
    del meta["version"]
    meta["weights"]["compression"] = "zstd"
    (p / "model.json").write_text(json.dumps(meta | {"notes": "x"}))
    with pytest.raises(ModelPackageError, match="model.json") as err:
        load_model(p)
    said = str(err.value)
    assert "the required key 'version' is missing" in said
    assert "unknown 'weights' keys ['compression'] (known: ['file', 'sha256', 'dtype', 'tensors'])" in said
    assert "unknown keys ['notes']" in said


def test_shipped_model_json_reads_and_writes_back_unchanged(tmp_path: Path) -> None:
    """The record holds all of model.json: the shipped package written back is the same file."""
    from seg.package import DEMO_DIR, read_meta, write_meta

    write_meta(tmp_path, read_meta(DEMO_DIR))
    assert (tmp_path / "model.json").read_bytes() == (DEMO_DIR / "model.json").read_bytes()


def test_one_network_pass_serves_every_refinement_rule(tmp_path: Path) -> None:
    """network_pass() then labels(rule) is segment() for the package's rule and for none, so a
    benchmark can compare rules on one pass; a rule whose gates read the background probability
    is refused on a pass that did not keep it."""
    from seg.infer import network_pass
    from seg.train import EXPORTED_HU_REFINEMENT

    asks = InferenceOptions(hu_refinement=EXPORTED_HU_REFINEMENT)
    pkg = load_model(_package(tmp_path / "m", inference=asks), device="cpu")
    ct = _ct()
    done = network_pass(ct, pkg)
    assert done.prediction.background is not None  # the package's rule reads it
    refined, plain = done.labels(EXPORTED_HU_REFINEMENT), done.labels(None)
    np.testing.assert_array_equal(refined.array, segment(ct, pkg).array)
    np.testing.assert_array_equal(plain.array, segment(ct, pkg, hu_refinement=False).array)
    assert not np.array_equal(refined.array, plain.array)  # the rule changed something here
    assert np.allclose(refined.affine, ct.affine)
    bare = network_pass(ct, pkg, background=False)
    np.testing.assert_array_equal(bare.labels(None).array, plain.array)
    with pytest.raises(ValueError, match="background probability"):
        bare.labels(EXPORTED_HU_REFINEMENT)
