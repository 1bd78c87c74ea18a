"""A short training run produces a loadable package and resumes from its checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from seg import recipe
from seg.hu_refine import HURefinement
from seg.model import load_model
from seg.train import (
    EXPORTED_HU_REFINEMENT,
    CropSampler,
    TrainConfig,
    build_cache,
    phantom_plan,
    preprocess_config,
    train,
    training_uses_bf16,
    validation_plan,
)

ARCH = {"in_channels": 1, "out_channels": 30, "img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 48,
        "mlp_dim": 96, "num_heads": 4, "proj_type": "conv", "norm_name": "instance", "res_block": True,
        "dropout_rate": 0.0}


def _cfg(tmp: Path, steps: int) -> TrainConfig:
    return TrainConfig(out=str(tmp / "pkg"), checkpoint_dir=str(tmp / "ck"), phantoms=2, seed_start=70000,
                       val_phantoms=1, phantom_z_range_mm=(-30.0, 30.0), arch=dict(ARCH), steps=steps,
                       val_every=2, batch_size=1, threads=1, name="tiny", version="0.0.1", demo=True)


@pytest.mark.slow
def test_short_training_run_exports_and_resumes(tmp_path: Path) -> None:
    callers_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pkg_dir = train(_cfg(tmp_path, 3), progress=False)  # on 1 thread
        assert torch.get_num_threads() == 2  # the caller's count is back (later tests segment on it)
    finally:
        torch.set_num_threads(callers_threads)
    pkg = load_model(pkg_dir, device="cpu")
    prov = pkg.meta.provenance
    assert prov["steps"] in (2, 3) and prov["trained_on"]["train_seeds"] == [70000, 70001]
    assert prov["trained_on"]["val_seeds"] == [70002] and prov["train_wall_s"] > 0
    assert pkg.info.demo is True
    # the exported package asks for the project's HU refinement of its label edges, claims gated,
    # and cuts in the slices with metal gated
    assert pkg.inference.hu_refinement == EXPORTED_HU_REFINEMENT != HURefinement()
    assert EXPORTED_HU_REFINEMENT.claim_max_background == 0.8
    assert EXPORTED_HU_REFINEMENT.metal_slice_cut_min_background == 0.1
    ck = torch.load(tmp_path / "ck" / "last.pt", weights_only=False)
    assert ck["step"] == 3
    before = {k: v.clone() for k, v in ck["model"].items()}
    # resume: continues at step 3 (cache reused), ends at 5 with changed weights; these two steps run the
    # forward pass under bf16 autocast (weights and optimiser state stay fp32)
    resumed_cfg = _cfg(tmp_path, 5)
    resumed_cfg.precision = "bf16"
    train(resumed_cfg, resume=True, progress=False)
    ck2 = torch.load(tmp_path / "ck" / "last.pt", weights_only=False)
    assert ck2["step"] == 5
    assert [h["step"] for h in ck2["history"]] == [2, 3, 4, 5]
    assert any(not torch.equal(before[k], ck2["model"][k]) for k in before)
    assert all(v.dtype == before[k].dtype for k, v in ck2["model"].items())
    assert all(np.isfinite(h["loss"]) for h in ck2["history"])
    assert len(list((tmp_path / "ck" / "cache").glob("*_image.npy"))) == 3
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["steps"] == 5
    # warm start: a fresh run (no checkpoints) initialised from the package begins with its weights
    warm = _cfg(tmp_path / "warm", 0)
    warm.cache_dir, warm.init_from = str(tmp_path / "ck" / "cache"), str(pkg_dir)
    warm_pkg = load_model(train(warm, progress=False), device="cpu")
    start = warm_pkg.network.state_dict()
    campaign = warm_pkg.meta.provenance["campaign"]  # the legs keep adding up across packages
    assert [g["steps"] for g in campaign["legs"]] == [5, 0] and campaign["total_steps"] == 5
    assert campaign["legs"][1]["init_from"] == str(pkg_dir)
    resumed = load_model(pkg_dir, device="cpu").network.state_dict()  # the resumed run re-exported it
    assert all(torch.equal(v, start[k]) for k, v in resumed.items())
    # footprint-averaged images: a cache of linearly sampled ones is refused, a fresh one is built, and
    # the package says how its images were made
    boxed = _cfg(tmp_path / "box", 0)
    boxed.cache_dir, boxed.init_from = str(tmp_path / "ck" / "cache"), str(pkg_dir)
    boxed.image_resampling = "box"
    with pytest.raises(ValueError, match="preprocessed as"):
        train(boxed, progress=False)
    boxed.cache_dir = None
    box_pkg = load_model(train(boxed, progress=False), device="cpu")
    assert box_pkg.preprocess.image_resampling == "box" and pkg.preprocess.image_resampling == "bilinear"
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


def test_post_operative_cases_are_drawn_as_often_as_weighted(tmp_path: Path) -> None:
    """--postop-weight 3 with two post-operative cases of four: three crops in four from them; the
    default draws every case equally often (a case's label value tells which one a crop came from)."""
    cases = []
    for i in range(4):
        np.save(tmp_path / f"c{i}_image.npy", np.full((8, 8, 8), 0.5, np.float16))
        np.save(tmp_path / f"c{i}_labels.npy", np.full((8, 8, 8), 2 if i % 2 else 1, np.uint8))
        cases.append({"image": str(tmp_path / f"c{i}_image.npy"),
                      "labels": str(tmp_path / f"c{i}_labels.npy"), "postop": bool(i % 2)})

    def post_share(weight: float) -> float:
        s = CropSampler(cases, (8, 8, 8), 1.0, False, np.random.default_rng(3), postop_weight=weight)
        return float(np.mean([s.sample()[1].max() == 2 for _ in range(600)]))

    assert 0.69 < post_share(3.0) < 0.81
    assert 0.43 < post_share(1.0) < 0.57
    with pytest.raises(ValueError, match="postop_weight"):
        CropSampler(cases, (8, 8, 8), 1.0, False, np.random.default_rng(3), postop_weight=0.0)


def test_partial_volume_targets_and_class_balanced_centres(tmp_path: Path) -> None:
    """Fraction targets: one value per class summing to 1, background past the edge; centres by class
    reach a structure of a few voxels as often as a large one."""
    from seg import labels as L

    img = np.random.default_rng(0).random((20, 40, 50)).astype(np.float16)
    lab = np.zeros((20, 40, 50), np.uint8)
    lab[2:18, 5:35, 5:45] = 3  # large
    lab[10:12, 20:22, 20:22] = 9  # 8 voxels
    frac = np.zeros((L.NUM_CLASSES, 20, 40, 50), np.uint8)
    frac[lab.astype(np.int64), *np.indices(lab.shape)] = 255
    for name, a in (("image", img), ("labels", lab), ("fractions", frac)):
        np.save(tmp_path / f"a_{name}.npy", a)
    case = {k: str(tmp_path / f"a_{k}.npy") for k in ("image", "labels", "fractions")}
    s = CropSampler([case], (32, 32, 32), 1.0, False, np.random.default_rng(1), by_class=True, fractions=True)
    x, y = s.batch(4)
    assert x.shape == (4, 1, 32, 32, 32) and y.shape == (4, L.NUM_CLASSES, 32, 32, 32)
    assert y.dtype == torch.float32 and torch.allclose(y.sum(1), torch.ones(4, 32, 32, 32))
    assert bool((y[:, 0, 20:] == 1).all())  # x beyond 20 voxels is padding: background
    centres = [tuple(s.planner._centre(0)) for _ in range(400)]
    small = sum(lab[c] == 9 for c in centres)
    assert 120 < small < 280  # about half, not 8 in 20 000


def test_partial_volume_fractions_keep_every_volume() -> None:
    """1.5 x 1.5 x 3 mm CT to a 4 mm grid: class fractions sum to each structure's exact volume."""
    from seg import labels as L
    from seg.phantom import PhantomOptions, make_phantom
    from seg.preprocess import labels_to_model_probs, to_model_grid
    from seg.preprocess_config import PreprocessConfig

    ph = make_phantom(PhantomOptions(seed=4, spacing_mm=(1.5, 1.5, 3.0), position="FFS",
                                     slice_order="descending", z_range_mm=(-40.0, 20.0)))
    mg = to_model_grid(ph.ct, PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0)), ph.labels)
    frac = labels_to_model_probs(ph.labels, mg.affine, mg.image.shape, L.NUM_CLASSES)
    true_cm3 = np.bincount(ph.labels.array.ravel(), minlength=L.NUM_CLASSES) * ph.ct.voxel_volume_cm3
    grid_cm3 = frac.reshape(L.NUM_CLASSES, -1).sum(1) / 255.0 * 0.064
    present = true_cm3 > 1.0
    present[0] = False
    assert np.allclose(grid_cm3[present], true_cm3[present], rtol=0.002), (grid_cm3, true_cm3)
    # every model voxel's fractions sum to one (uint8 rounding aside)
    assert np.abs(frac.sum(0).astype(int) - 255).max() <= 8


def test_training_precision_choice() -> None:
    cpu = torch.device("cpu")
    assert training_uses_bf16("fp32", cpu) is False
    assert training_uses_bf16("bf16", cpu) is True
    from seg.runtime import cpu_has_bf16

    assert training_uses_bf16("auto", cpu) is cpu_has_bf16()
    with pytest.raises(ValueError, match="precision must be"):
        training_uses_bf16("fp16", cpu)


def test_closed_training_choices_are_checked_when_configured() -> None:
    """crop, targets, image_resampling, device and precision are Literals of TrainConfig: a misspelt
    one is refused when the run is configured (or changed), not when training reaches it; the
    command line offers the same choices and refuses others as a usage error."""
    from typer.testing import CliRunner

    from dicomnode.cli import app

    for field, value in (("crop", "class"), ("targets", "soft"), ("image_resampling", "lanczos"),
                         ("device", "gpu"), ("precision", "fp16")):
        with pytest.raises(ValueError, match=field):
            TrainConfig(**{field: value})
        cfg = TrainConfig()
        with pytest.raises(ValueError, match=field):
            setattr(cfg, field, value)
    result = CliRunner().invoke(app, ["train", "--phantoms", "1", "--out", "x", "--crop", "class"])
    said = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2
    assert "'--crop': Value error, 'class' is not one of 'foreground', 'classes'" in said
    assert TrainConfig(device="cuda:1").device == "cuda:1"  # a GPU by index, as the node's worker.device
    result = CliRunner().invoke(app, ["train", "--phantoms", "1", "--out", "x", "--device", "gpu"])
    assert result.exit_code == 2 and "must be auto, cpu, cuda or cuda:N" in result.output


def test_class_weights_reach_the_loss_and_a_misspelt_class_is_refused() -> None:
    """A class weighted 3 costs the loss more when its own voxels are mislabelled than the mirror
    error costs (the unweighted loss cannot tell the two apart); a misspelt class or a weight that
    is not positive is refused when the run is configured, and on the command line before any work."""
    from typer.testing import CliRunner

    from dicomnode.cli import app
    from seg.labels import LABEL_OF
    from seg.loss import loss_class_weights
    from seg.train import _setup

    weighted, other = LABEL_OF["obturator_externus"], LABEL_OF["sartorius"]
    truth = torch.zeros(1, 30, 30, 2, 2)
    truth[0, torch.arange(30), torch.arange(30)] = 1.0  # class c fills the slab x = c

    def wrong(true_class: int, said: int) -> torch.Tensor:
        logits = truth.argmax(1)
        logits[:, true_class] = said
        return torch.nn.functional.one_hot(logits, 30).permute(0, 4, 1, 2, 3).float() * 8

    def losses(class_weights: dict[str, float]) -> tuple[float, float]:
        cfg = TrainConfig(arch=dict(ARCH), device="cpu", precision="fp32", class_weights=class_weights)
        loss_fn = _setup(cfg).loss_fn
        return (float(loss_fn(wrong(weighted, other), truth)), float(loss_fn(wrong(other, weighted), truth)))

    plain_a, plain_b = losses({})
    assert plain_a == pytest.approx(plain_b, rel=1e-6)
    weighted_a, weighted_b = losses({"obturator_externus": 3.0})
    assert weighted_a > weighted_b * 1.2 and weighted_b > plain_b
    assert loss_class_weights({}) is None
    assert loss_class_weights({"femur": 0.5})[LABEL_OF["femur"]] == 0.5
    with pytest.raises(ValueError, match="did you mean 'obturator_externus'"):
        TrainConfig(class_weights={"obturator_extrenus": 3.0})
    with pytest.raises(ValueError, match="must be positive"):
        TrainConfig(class_weights={"femur": 0.0})
    for value, said in (("obturator_extrenus=3", "did you mean 'obturator_externus'"),
                        ("femur", "give NAME=W"), ("femur=two", "give NAME=W"),
                        ("femur=-1", "must be positive"), ("femur=inf", "must be positive and finite"),
                        ("femur=nan", "must be positive and finite")):
        result = CliRunner().invoke(app, ["train", "--phantoms", "1", "--out", "x", "--class-weight", value])
        assert result.exit_code == 2 and said in " ".join(result.output.replace("│", " ").split()), value


def test_phantom_plan_post_operative_share_and_validation_plan() -> None:
    base = phantom_plan(16, 1000)
    assert [i for i, p in enumerate(base) if p.postop] == [3, 7, 11, 15]  # the held-out plan
    half = phantom_plan(16, 1000, postop_share=0.5)
    post = [i for i, p in enumerate(half) if p.postop]
    assert post == [2, 3, 6, 7, 10, 11, 14, 15]
    # implants on both patient positions, and the 0.25 plan's post-op phantoms unchanged (cache ids stay)
    assert {half[i].position for i in post} == {"HFS", "FFS"}
    assert all(half[i] == base[i] for i in (3, 7, 11, 15))
    assert [p.seed for p in half] == list(range(1000, 1016))
    with pytest.raises(ValueError, match="postop_share"):
        phantom_plan(4, 1000, postop_share=0.3)
    val = validation_plan(3, 2000)
    assert [p.postop for p in val] == [True, False, True]
    assert val[0].atrophy and val[0].implant_side in ("left", "right")
    # a training plan may atrophy further; the default stays the held-out plan's, phantom for phantom
    assert phantom_plan(16, 1000, atrophy_kept_min=recipe.ATROPHY_KEPT_MIN) == base
    kept = [f for i in (3, 7, 11, 15) for f in base[i].atrophy.values()]
    assert min(kept) >= 0.6 and max(kept) < 0.95
    deeper = phantom_plan(16, 1000, atrophy_kept_min=0.3)
    assert [p.atrophy.keys() for p in deeper] == [p.atrophy.keys() for p in base]  # the same muscles
    assert all(0.3 <= f < 0.95 for p in deeper for f in p.atrophy.values())
    assert min(f for p in deeper for f in p.atrophy.values()) < 0.6


def test_a_cached_phantom_is_named_by_its_options_and_the_generator_version(monkeypatch) -> None:
    """A new phantom version renders other images from the same options: its cache entries must be
    new names, while version 1.0's names stay those of the caches made before the version counted."""
    import seg.train

    opts = phantom_plan(1, 7000)[0]
    monkeypatch.setattr(seg.train, "PHANTOM_VERSION", "1.0")
    v10 = seg.train.phantom_case_id(opts, None)
    monkeypatch.setattr(seg.train, "PHANTOM_VERSION", "1.1")
    v11 = seg.train.phantom_case_id(opts, None)
    assert v10 == "ph7000_64ba4b7d" and v11.startswith("ph7000_") and v11 != v10
    assert seg.train.phantom_case_id(opts, (0.0, 100.0)) != v11


def test_phantoms_cached_in_parallel_are_the_ones_cached_serially(tmp_path: Path) -> None:
    """--cache-workers 2: the same files, case for case, as one process writes."""
    caches = {}
    for workers in (1, 2):
        cfg = _cfg(tmp_path / f"w{workers}", 0)
        cfg.cache_workers = workers
        train_cases, val_cases, prov = build_cache(cfg, preprocess_config(cfg))
        assert [len(train_cases), len(val_cases)] == [2, 1] and prov["train_seeds"] == [70000, 70001]
        caches[workers] = train_cases + val_cases
    for one, two in zip(caches[1], caches[2], strict=True):
        assert Path(one["image"]).name == Path(two["image"]).name and one["postop"] == two["postop"]
        for key in ("image", "labels", "fractions"):
            assert np.array_equal(np.load(one[key]), np.load(two[key])), key



def test_train_defaults_are_the_shipped_demo_recipe() -> None:
    """`dicomnode train` with no recipe options trains what the shipped package is: its architecture,
    its grid; the command line's defaults and TrainConfig's are the same numbers (seg/recipe.py)."""
    import typer

    from dicomnode.cli import app
    from seg import recipe

    shipped = load_model(None, device="cpu").meta
    assert shipped.architecture.args == recipe.DEMO_UNETR == TrainConfig().arch
    assert shipped.preprocessing.spacing_mm == (recipe.SPACING_MM,) * 3 == tuple(TrainConfig().spacing_mm)
    params = {p.name: p.default for p in typer.main.get_command(app).commands["train"].params}
    cfg = TrainConfig()
    assert (params["batch_size"], params["lr"]) == (cfg.batch_size, cfg.lr) == (recipe.BATCH_SIZE, recipe.LR)
    assert float(params["spacing"]) == recipe.SPACING_MM and params["roi"] == recipe.DEMO_UNETR["img_size"][0]
    assert [params[k] for k in ("feature_size", "hidden_size", "num_heads", "mlp_dim")] == [
        recipe.DEMO_UNETR[k] for k in ("feature_size", "hidden_size", "num_heads", "mlp_dim")]
    assert (params["postop_share"], params["postop_weight"], params["warmup_steps"]) == (
        cfg.postop_share, cfg.postop_weight, cfg.warmup_steps)


@pytest.mark.slow
def test_train_command_passes_its_options_to_the_run(tmp_path: Path) -> None:
    """The command line as docs/models.md gives it: each option reaches the run (the package's recorded
    configuration), the package loads, and a misspelt choice is refused before any work."""
    from typer.testing import CliRunner

    from dicomnode.cli import app

    args = ["train", "--out", str(tmp_path / "pkg"), "--phantoms", "2", "--seed-start", "70000",
            "--checkpoints", str(tmp_path / "ck"), "--steps", "2", "--val-every", "2", "--z-range", "-30,30",
            "--roi", "32", "--feature-size", "4", "--hidden-size", "48", "--mlp-dim", "96",
            "--batch-size", "1", "--lr", "2.5e-4", "--postop-share", "0.75", "--postop-weight", "2",
            "--atrophy-kept-min", "0.4",
            "--streak-prob", "0.5", "--warmup-steps", "1", "--class-weight", "quadratus_femoris=2",
            "--decay-start", "0.4", "--threads", "1", "--version", "0.0.2", "--demo", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    pkg = load_model(tmp_path / "pkg", device="cpu")
    config = pkg.meta.provenance["config"]
    assert (config["lr"], config["postop_share"], config["postop_weight"], config["batch_size"]) == (
        2.5e-4, 0.75, 2.0, 1)
    assert config["streak_prob"] == 0.5 and config["class_weights"] == {"quadratus_femoris": 2.0}
    assert config["atrophy_kept_min"] == 0.4
    assert (config["warmup_steps"], config["decay_start"], config["spacing_mm"]) == (1, 0.4, [4.0] * 3)
    assert pkg.meta.architecture.args["img_size"] == [32] * 3 and pkg.info.version == "0.0.2"
    refused = CliRunner().invoke(app, [*args, "--postop-share", "0.3"])
    assert refused.exit_code == 2 and "0.25, 0.5 or 0.75" in refused.output
    refused = CliRunner().invoke(app, [*args, "--streak-prob", "1.5"])
    assert refused.exit_code == 2 and "--streak-prob must be between 0 and 1" in refused.output
    refused = CliRunner().invoke(app, [*args, "--atrophy-kept-min", "0.7"])
    assert refused.exit_code == 2 and "--atrophy-kept-min must be above 0 and at most 0.6" in refused.output


def test_numeric_training_settings_are_checked_when_configured() -> None:
    """A share outside 0..1, a count below 1 or a learning rate that is not a positive finite number
    is refused by TrainConfig itself (so scripts/gpu_leg.py and the command line get one rule), and
    the command line names each option it refuses, before anything is rendered."""
    from typer.testing import CliRunner

    from dicomnode.cli import app

    for field, value in (("lr", 0.0), ("lr", float("inf")), ("batch_size", 0), ("decay_start", 1.5),
                         ("implant_crop_prob", -0.1), ("postop_weight", float("nan")), ("threads", 0),
                         ("max_minutes", -5.0), ("warmup_steps", -1), ("postop_share", 0.3),
                         ("atrophy_kept_min", 0.0), ("atrophy_kept_min", 0.7)):
        with pytest.raises(ValueError, match=field):
            TrainConfig(**{field: value})
        cfg = TrainConfig()
        with pytest.raises(ValueError, match=field):
            setattr(cfg, field, value)
    assert TrainConfig(decay_start=1.0, warmup_steps=0, max_minutes=None).decay_start == 1.0
    result = CliRunner().invoke(app, ["train", "--phantoms", "1", "--out", "x", "--batch-size", "0",
                                      "--lr", "-1e-3", "--checkpoints", "/nonexistent/never-made"])
    said = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, said
    assert "--batch-size must be at least 1; --lr must be positive and finite" in said
    assert not Path("/nonexistent/never-made").exists()


def test_site_dataset_trains_with_label_maps_in_any_voxel_order(tmp_path: Path) -> None:
    """`dicomnode train --data`: a case folder of DICOM and a label map that another tool saved in
    another voxel order trains on the same targets as one saved in the CT's order; a label map on
    another grid stops the run naming its case."""
    from seg.io import load_nifti, save_nifti
    from seg.phantom import PhantomOptions, make_phantom, write_phantom
    from seg.volume import Volume

    data = tmp_path / "data"
    write_phantom(make_phantom(PhantomOptions(seed=3, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-30, 30))),
                  data / "a")
    shutil.copytree(data / "a" / "dicom", data / "b" / "dicom")
    lab = load_nifti(data / "a" / "truth" / "labels.nii.gz")
    a = lab.affine
    flipped = np.eye(4)
    flipped[:3, :3] = a[:3, :3] @ np.diag([1.0, 1.0, -1.0])  # slices the other way
    flipped[:3, 3] = a[:3, 3] + a[:3, 2] * (lab.shape[2] - 1)
    save_nifti(Volume(np.ascontiguousarray(lab.array[:, :, ::-1]), flipped), data / "b" / "labels.nii.gz")
    cfg = TrainConfig(out=str(tmp_path / "pkg"), checkpoint_dir=str(tmp_path / "ck"), data=str(data),
                      arch=dict(ARCH), steps=1, val_every=1, batch_size=1, threads=1, name="site",
                      version="0.0.1")
    pkg = load_model(train(cfg, progress=False), device="cpu")
    assert pkg.meta.provenance["trained_on"]["cases"] == ["a", "b"]
    cache = tmp_path / "ck" / "cache"
    assert np.array_equal(np.load(cache / "a_labels.npy"), np.load(cache / "b_labels.npy"))
    save_nifti(Volume(lab.array, a @ np.diag([1.0, 1.0, 2.0, 1.0])), data / "b" / "labels.nii.gz")
    with pytest.raises(ValueError, match="case b: the label map is not on the CT's grid"):
        train(TrainConfig(**{**cfg.__dict__, "checkpoint_dir": str(tmp_path / "ck2")}), progress=False)


def test_site_labels_are_checked_before_any_cast_and_a_corrected_map_is_cached_again(tmp_path: Path) -> None:
    """A label value that is no class (256 would wrap to background, 3.4 would become 3) stops the run
    naming the case and the values; a case folder without its label map stops it too (not skipped);
    a label map corrected after caching is cached again, not trained on as it was."""
    from seg.dataset import DatasetCase, label_map_uint8
    from seg.io import load_nifti, save_nifti
    from seg.phantom import PhantomOptions, make_phantom, write_phantom
    from seg.train import build_cache, preprocess_config
    from seg.volume import Volume

    case = DatasetCase("c", Path("c/ct.nii.gz"), Path("c/labels.nii.gz"))
    with pytest.raises(ValueError, match=r"case c: label values 3.4 in c/labels.nii.gz are not whole"):
        label_map_uint8(case, np.array([0, 1, 3.4, 256]))
    with pytest.raises(ValueError, match=r"case c: label values -1, 256 are not classes 0..29"):
        label_map_uint8(case, np.array([-1, 1, 256]))
    assert label_map_uint8(case, np.array([0.0, 29.0])).dtype == np.uint8
    data = tmp_path / "data"
    write_phantom(make_phantom(PhantomOptions(seed=3, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-30, 30))),
                  data / "a")
    lab = load_nifti(data / "a" / "truth" / "labels.nii.gz")
    cfg = TrainConfig(out=str(tmp_path / "pkg"), checkpoint_dir=str(tmp_path / "ck"), data=str(data),
                      arch=dict(ARCH), name="site", version="0.0.1")
    wrong = np.asarray(lab.array, np.int16)
    wrong[wrong == 3] = 256
    save_nifti(Volume(wrong, lab.affine), data / "a" / "labels.nii.gz")
    with pytest.raises(ValueError, match="case a: label values 256 are not classes"):
        build_cache(cfg, preprocess_config(cfg))
    cut = np.asarray(lab.array, np.uint8).copy()
    cut[cut == 3] = 0  # an earlier, wrong annotation without vastus lateralis
    save_nifti(Volume(cut, lab.affine), data / "a" / "labels.nii.gz")
    (train_cases, _, _) = build_cache(cfg, preprocess_config(cfg))
    assert 3 not in np.unique(np.load(train_cases[0]["labels"]))
    save_nifti(lab, data / "a" / "labels.nii.gz")  # corrected
    (train_cases, _, _) = build_cache(cfg, preprocess_config(cfg))
    assert 3 in np.unique(np.load(train_cases[0]["labels"]))
    (data / "b" / "dicom").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"without a CT or a label map .*: b \(no label map\)"):
        build_cache(cfg, preprocess_config(cfg))


def test_train_check_reads_every_case_and_trains_nothing(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`dicomnode train --data DIR --check`: every case read as training reads it, every bad one named
    (not only the first), voxels per class and missing classes within 80 columns; nothing written."""
    from typer.testing import CliRunner

    from dicomnode.cli import app
    from seg.io import load_nifti, save_nifti
    from seg.phantom import PhantomOptions, make_phantom, write_phantom
    from seg.volume import Volume

    data = tmp_path / "data"
    write_phantom(make_phantom(PhantomOptions(seed=5, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-20, 20))),
                  data / "a")
    lab = load_nifti(data / "a" / "truth" / "labels.nii.gz")
    for name in ("b_no_vastus", "c_wrong_value", "d_off_grid"):
        (data / name).mkdir()
        (data / name / "dicom").symlink_to(data / "a" / "dicom")
    cut = np.asarray(lab.array, np.int16).copy()
    cut[cut == 3] = 0
    save_nifti(Volume(cut, lab.affine), data / "b_no_vastus" / "labels.nii.gz")
    cut[cut == 2] = 256
    save_nifti(Volume(cut, lab.affine), data / "c_wrong_value" / "labels.nii.gz")
    save_nifti(Volume(lab.array, lab.affine @ np.diag([1.0, 1.0, 2.0, 1.0])),
               data / "d_off_grid" / "labels.nii.gz")
    (data / "e_no_ct").mkdir()  # a label map without its CT: one bad case, not the end of the check
    save_nifti(lab, data / "e_no_ct" / "labels.nii.gz")
    monkeypatch.chdir(tmp_path)  # the default --checkpoints folder would be here
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--check", "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    text = " ".join(result.output.split())
    assert ("c_wrong_value label values 256 are not classes 0..29 (seg/structures.csv) in "
            "c_wrong_value/labels.nii.gz; a dataset in its own numbering needs a labels.csv") in text
    assert "d_off_grid the label map is not on the CT's grid" in text
    assert "e_no_ct no CT (one of ct.nii.gz, image.nii.gz, ct.nii, dicom)" in text
    assert "5 cases checked, 3 would stop training: c_wrong_value, d_off_grid, e_no_ct" in text
    (row_a,) = [line for line in lines if line.startswith("a ")]
    (row_b,) = [line for line in lines if line.startswith("b_no_vastus")]
    assert int(row_b.split()[-1]) == int(row_a.split()[-1]) + 1  # vastus lateralis, besides the others
    (vastus,) = [line for line in lines if line.split()[:1] == ["3"]]
    assert vastus.split()[-1] == "1/2"  # of the two readable cases
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no checkpoints, no package
    for bad in ("c_wrong_value", "d_off_grid", "e_no_ct"):
        shutil.rmtree(data / bad)
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--check", "--no-progress"])
    assert result.exit_code == 0 and "2 cases checked: every case reads" in result.output, result.output
    refused = CliRunner().invoke(app, ["train", "--phantoms", "2", "--check"])
    assert refused.exit_code == 2 and "give --data DIR" in refused.output
