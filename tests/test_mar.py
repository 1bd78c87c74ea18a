"""Metal artefact reduction: streaks made in projection space are removed there, nothing else moves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from seg.infer import segment
from seg.mar import MarConfig, reduce_metal_artefacts
from seg.metal_proximity import METAL_HU
from seg.model import build_network, load_model, save_package
from seg.package import Architecture, read_meta
from seg.preprocess_config import PreprocessConfig
from seg.records import ModelInfo
from seg.tomo import ParallelBeam
from seg.volume import Volume

SP = 1.5  # mm


def _slices() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(clean, streaked, metal, distance from the metal's centre in mm) of one axial slice: a thigh
    of muscle in fat around a femur holding two metal rods; the streaks are those of a hardened
    beam (each metal integral p measured as p - 0.05 p^2), reconstructed by FBP."""
    ii, jj = np.mgrid[:int(240 / SP), :int(180 / SP)] * SP
    clean = np.where(((ii - 120) / 110) ** 2 + ((jj - 90) / 80) ** 2 < 1, -100.0, -1000.0)
    clean[((ii - 120) / 80) ** 2 + ((jj - 90) / 60) ** 2 < 1] = 50.0
    clean[np.hypot(ii - 120, jj - 90) < 18] = 700.0
    metal = ((np.abs(ii - 112) < 4) | (np.abs(ii - 128) < 4)) & (np.abs(jj - 90) < 6)
    clean[metal] = 3071.0
    beam = ParallelBeam.covering(clean.shape, 360)
    p_metal = beam.project(beam.embed(metal * 0.5 * SP)).numpy()  # line integrals, 0.5/mm
    err = -0.05 * p_metal.astype(np.float64) ** 2 / SP  # per pixel, 1/mm
    streaks = beam.crop(beam.reconstruct(torch.from_numpy(err.astype(np.float32))), clean.shape)[0]
    streaked = np.where(metal | (clean == -1000.0), clean, clean + streaks * 1000.0 / 0.02)
    return clean.astype(np.float32), streaked.astype(np.float32), metal, np.hypot(ii - 120, jj - 90)


def _volume(*slices: np.ndarray) -> Volume:
    return Volume(np.stack(slices, axis=2), np.diag([SP, SP, 3.0, 1.0]))


def test_streaks_shrink_several_fold_away_from_the_metal() -> None:
    """Measured 20-70 mm from the metal, as the streaks' broad part (smoothed over the 3 mm work
    grid's pixel, finer than which the correction is not computed) and as they are."""
    from scipy import ndimage

    clean, streaked, metal, r = _slices()
    ring = (r > 20) & (r < 70) & (clean > -1000)
    out = reduce_metal_artefacts(_volume(streaked)).array[..., 0]

    def broad(img: np.ndarray) -> float:
        return float(np.abs(ndimage.gaussian_filter(img - clean, 3.0 / SP))[ring].mean())

    assert broad(streaked) > 30  # the streaks are there to remove
    assert broad(out) < broad(streaked) / 4, (broad(streaked), broad(out))
    before, after = (float(np.abs(img - clean)[ring].mean()) for img in (streaked, out))
    assert after < before / 2.5, (before, after)


def test_slices_without_metal_and_metal_voxels_are_unchanged() -> None:
    clean, streaked, metal, _ = _slices()
    no_metal = np.minimum(np.where(metal, 700.0, streaked), 2000.0).astype(np.float32)
    vol = _volume(no_metal, streaked, no_metal)
    out = reduce_metal_artefacts(vol).array
    assert np.array_equal(out[..., 0], no_metal) and np.array_equal(out[..., 2], no_metal)
    assert np.array_equal(out[..., 1][streaked > METAL_HU], streaked[streaked > METAL_HU])
    assert not np.array_equal(out[..., 1], streaked)
    assert np.array_equal(vol.array[..., 1], streaked)  # the input is not written to
    nothing = _volume(no_metal)
    assert reduce_metal_artefacts(nothing) is nothing


def test_integer_ct_stays_integer() -> None:
    _, streaked, metal, _ = _slices()
    vol = _volume(np.rint(streaked).astype(np.int16))
    out = reduce_metal_artefacts(vol, MarConfig(work_mm=2.5)).array
    assert out.dtype == np.int16 and (out > METAL_HU).sum() == (streaked > METAL_HU).sum() >= metal.sum()


def test_config_round_trip_and_none_is_not_written() -> None:
    """"none" is left out of the record, so every model.json and cache record reads and compares
    as before; any other value is written and read back."""
    assert "metal_artefact_reduction" not in PreprocessConfig().model_dump()
    d = PreprocessConfig(metal_artefact_reduction="li").model_dump(mode="json")
    assert d["metal_artefact_reduction"] == "li"
    assert PreprocessConfig.model_validate(d) == PreprocessConfig(metal_artefact_reduction="li")
    assert PreprocessConfig.model_validate(PreprocessConfig().model_dump(mode="json")) == PreprocessConfig()
    with pytest.raises(ValueError):
        PreprocessConfig(metal_artefact_reduction="nmar")  # type: ignore[arg-type]
    assert "metal_artefact_reduction" not in ModelInfo().model_dump()
    assert ModelInfo(metal_artefact_reduction="li").model_dump()["metal_artefact_reduction"] == "li"


TINY = {"in_channels": 1, "out_channels": 30, "img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 48,
        "mlp_dim": 96, "num_heads": 4, "proj_type": "conv", "norm_name": "instance", "res_block": True,
        "dropout_rate": 0.0}


def _package(path: Path, mar: str) -> Path:
    torch.manual_seed(0)
    net = build_network(Architecture(args=TINY))
    pre = PreprocessConfig(spacing_mm=(3.0, 3.0, 3.0), metal_artefact_reduction=mar)  # type: ignore[arg-type]
    return save_package(path, net, name="unit-test", version="9.9", arch_args=TINY, preprocess=pre,
                        roi_size=(32, 32, 32), demo=True, provenance={"note": "random weights"})


def test_segment_reduces_metal_artefacts_first_when_the_package_asks(tmp_path: Path) -> None:
    _, streaked, _, _ = _slices()
    ct = _volume(*[streaked] * 6)
    on, off = load_model(_package(tmp_path / "on", "li")), load_model(_package(tmp_path / "off", "none"))
    assert read_meta(tmp_path / "on").preprocessing.metal_artefact_reduction == "li"
    assert "metal_artefact_reduction" not in (tmp_path / "off" / "model.json").read_text()
    assert on.info.metal_artefact_reduction == "li" and off.info.metal_artefact_reduction == "none"
    got = segment(ct, on)
    assert np.array_equal(got.array, segment(reduce_metal_artefacts(ct), off).array)
    assert not np.array_equal(got.array, segment(ct, off).array)
    assert np.array_equal(got.affine, ct.affine)


def test_evaluate_names_the_reduction_only_when_the_package_asks() -> None:
    from seg.evaluate import format_table
    from seg.records import Evaluation

    assert "metal artefact reduction: li" in format_table(
        Evaluation(model=ModelInfo(metal_artefact_reduction="li")))
    assert "metal artefact" not in format_table(Evaluation(model=ModelInfo()))


def test_training_caches_the_ct_as_inference_will_read_it(tmp_path: Path) -> None:
    """A run with ``metal_artefact_reduction="li"`` trains on corrected CTs and exports a package that
    asks for them; its cache refuses to be shared with a run without the reduction."""
    from seg.preprocess import to_model_grid
    from seg.train import TrainConfig, _claim_cache, cache_case, preprocess_config

    _, streaked, _, _ = _slices()
    ct = _volume(*[streaked] * 6)
    labels = ct.with_array((ct.array > 0).astype(np.uint8))
    pre = preprocess_config(TrainConfig(spacing_mm=(3.0, 3.0, 3.0), metal_artefact_reduction="li"))
    assert pre.metal_artefact_reduction == "li"
    (tmp_path / "on").mkdir()
    _claim_cache(tmp_path / "on", pre)
    paths = cache_case(tmp_path / "on", "c", ct, labels, pre, fractions=False)
    cached = np.load(paths["image"])
    want = to_model_grid(reduce_metal_artefacts(ct), pre, labels).image.astype(np.float16)
    assert np.array_equal(cached, want)
    plain = to_model_grid(ct, pre, labels).image.astype(np.float16)
    assert not np.array_equal(cached, plain)
    with pytest.raises(ValueError, match="preprocessed as"):
        _claim_cache(tmp_path / "on", preprocess_config(TrainConfig(spacing_mm=(3.0, 3.0, 3.0))))
