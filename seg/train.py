"""Train a MONAI UNETR on labelled CT (site data or synthetic phantoms) and export a model package.

Cases are preprocessed once onto the model grid and cached as .npy (image float16, labels uint8), so a
training step only crops, jitters and runs the network. Checkpoints (model, optimiser, step, best
validation) are written every few minutes; ``resume=True`` continues from the last one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydantic
import torch

from seg import labels as L
from seg import recipe
from seg.dataset import case_source, dataset_cases, load_case
from seg.hu_refine import HURefinement
from seg.loss import LossFn, build_loss, loss_class_weights
from seg.mar import as_configured
from seg.metal_proximity import METAL_HU
from seg.model import (
    build_network,
    load_model,
    resolve_device,
    save_package,
)
from seg.package import Architecture, InferenceOptions, ModelPackageError
from seg.phantom.options import PHANTOM_VERSION, PhantomOptions
from seg.preprocess import labels_to_model_probs, to_model_grid
from seg.preprocess_config import ImageResampling, PreprocessConfig, TrainingMetalArtefactReduction
from seg.recipe import (
    POSTOP_SHARES,
    AtrophyKept,
    Count,
    Crop,
    Device,
    Loss,
    NotNegative,
    NotNegativeCount,
    Positive,
    PostopShare,
    Precision,
    Share,
    Targets,
)
from seg.streaks import Streaks, add_to_windowed, draw_streaks, streak_field
from seg.volume import Volume

if TYPE_CHECKING:
    from seg.phantom import Phantom

log = logging.getLogger(__name__)

@pydantic.dataclasses.dataclass(config=pydantic.ConfigDict(validate_assignment=True))
class TrainConfig:
    """Everything that decides a training run (recorded in the package provenance); the closed
    choices are Literals, checked when the run is configured, not when it reaches them."""

    out: str = "seg/models/site"
    checkpoint_dir: str = "checkpoints/run"
    cache_dir: str | None = None  # default: <checkpoint_dir>/cache
    data: str | None = None  # dataset folder (site CTs); None = phantoms
    phantoms: NotNegativeCount = 0
    seed_start: int = 1000
    val_phantoms: NotNegativeCount = 1  # post-operative first (validation_plan)
    postop_share: PostopShare = 0.25  # of the training phantoms (phantom_plan)
    # The least volume share an atrophied muscle of a post-operative training phantom keeps (the
    # held-out plan's: recipe.ATROPHY_KEPT_MIN). Lower shows the network muscles far smaller than
    # their neighbours' shape suggests, where it kept claiming a normal-sized muscle (docs/models.md).
    atrophy_kept_min: AtrophyKept = recipe.ATROPHY_KEPT_MIN
    # How much more often a crop comes from a post-operative training phantom than from another one
    # (1: every case equally often). Post-operative thighs (implant streaks, atrophy, fat) are where
    # the network errs most; more of them per step, without new data.
    postop_weight: Positive = 1.0
    # Share of crops that get metal streaks drawn over them (seg.streaks; 0: none, the old stream).
    streak_prob: Share = 0.0
    # Share of the crops from a case with metal that centre on its metal (0: none, the old stream).
    # Post-operative errors live where the implant's streaks cross small hip muscles (docs/models.md,
    # postop_errors --ablate); a foreground crop covers them only now and then.
    implant_crop_prob: Share = 0.0
    cache_workers: Count = 1  # processes that render and cache phantoms before the first step
    phantom_z_range_mm: tuple[float, float] | None = None  # small phantoms for tests
    arch: dict = field(default_factory=lambda: dict(recipe.DEMO_UNETR))
    spacing_mm: tuple[float, float, float] = (recipe.SPACING_MM,) * 3
    # How the CT reaches the model grid (seg.preprocess): "bilinear" samples it at each model voxel's
    # centre; "box" averages each model voxel's footprint, as the partial-volume targets do.
    image_resampling: ImageResampling = "bilinear"
    # Metal artefact reduction of every CT before the model grid (seg.mar): "li" trains on corrected
    # CTs, and the package then asks inference for the same.
    metal_artefact_reduction: TrainingMetalArtefactReduction = "none"
    batch_size: Count = recipe.BATCH_SIZE
    steps: NotNegativeCount = 1000  # 0: the warm start exported as it is (tests)
    max_minutes: Positive | None = None
    lr: Positive = recipe.LR
    weight_decay: NotNegative = 1e-5
    warmup_steps: NotNegativeCount = 20
    # Linear decay to 5 % over the last (1 - decay_start) of the run (by wall time when max_minutes is set).
    decay_start: Share = 0.7
    # Dice over the whole batch: classes absent from one crop do not push every prediction to zero.
    dice_batch: bool = True
    fg_crop_prob: Share = 0.85
    # "foreground": crops centred on any labelled voxel (large muscles dominate);
    # "classes": a structure drawn uniformly first, then one of its voxels (as MONAI's
    # RandCropByLabelClasses with equal ratios), so every structure is seen every few steps.
    crop: Crop = "foreground"
    # "partial_volume": each model voxel's target is the fraction of its footprint each class covers
    # (the volume-preserving target; a perfect model on nearest-neighbour labels at 4 mm caps near
    # 0.92 CT-grid Dice and -3 % volume, docs/models.md); "nearest": one label per voxel.
    targets: Targets = "partial_volume"
    flip_x: bool = True
    val_every: Count = 100
    checkpoint_minutes: Positive = 5.0
    threads: Count = 2
    name: str = "thigh-unetr-site"
    version: str = "0.1.0"
    demo: bool = False
    seed: int = 0
    device: Device = "auto"
    # "auto": bf16 autocast where the hardware runs it natively (CUDA with bf16, a CPU with AVX-512 BF16
    # or AMX: 1.8x faster per step on this project's Xeon VM), else fp32; weights and optimiser stay fp32.
    precision: Precision = "auto"
    # warm start from a model package's weights (same architecture and spacing), e.g. the shipped demo
    init_from: str | None = None
    # Loss weight of named classes (both terms of the loss), 1 for every other one:
    # the small hip muscles beside the implant are where post-operative volumes still err.
    class_weights: dict[str, float] = field(default_factory=dict)
    # "dicece": soft Dice + cross-entropy (every shipped leg); "dicefocal": the cross-entropy term
    # replaced by the softmax focal loss, which lets hard voxels carry more of the gradient (seg.loss).
    loss: Loss = "dicece"

    def __post_init__(self) -> None:
        loss_class_weights(self.class_weights)  # a misspelt class or a weight <= 0 stops the run here


def refused_settings(exc: pydantic.ValidationError, options: dict[str, str]) -> str:
    """What :class:`TrainConfig` refused, one clause a setting, each named by the option that gave it
    (``options``: field -> option where it is not the field's name with dashes), e.g.
    ``--batch-size must be at least 1; --lr must be positive and finite``."""
    def option(field: str) -> str:
        return options.get(field, "--" + field.replace("_", "-"))

    return "; ".join(f"{option(str(err['loc'][0]) if err['loc'] else '')} "
                     f"{err['msg'].removeprefix('Value error, ')}" for err in exc.errors())


# ---------------------------------------------------------------- data


def phantom_options(i: int, seed: int, postop: bool,
                    atrophy_kept_min: float = recipe.ATROPHY_KEPT_MIN) -> PhantomOptions:
    """Options of the i-th phantom of a plan: spacing, position and slice order cycle with i."""
    spacings = [(3.0, 3.0, 3.0), (1.5, 1.5, 3.0), (2.0, 2.0, 2.5), (2.5, 2.5, 4.0), (1.0, 1.0, 5.0)]
    common = {
        "seed": seed,
        "spacing_mm": spacings[i % len(spacings)],
        "position": "FFS" if i % 2 else "HFS",
        "slice_order": "descending" if i % 3 == 1 else "ascending",
    }
    if not postop:
        return PhantomOptions(**common)
    rng = np.random.default_rng(seed)
    side = "left" if rng.random() < 0.5 else "right"
    names = list(L.ANALYSED_MUSCLES)
    pick = rng.choice(len(names), size=6, replace=False)
    return PhantomOptions(
        **common,
        postop=True,
        implant_side=side,
        fat_infiltration=float(rng.uniform(0.0, 0.3)),
        atrophy={names[j]: float(rng.uniform(atrophy_kept_min, recipe.ATROPHY_KEPT_MAX)) for j in pick},
    )


def plan_record(opts: PhantomOptions) -> dict:
    """A plan's phantom as the package provenance and the cache ids record it: the options a plan
    sets (:func:`phantom_options`), nothing else, so both read as they always have."""
    d: dict = {"seed": opts.seed, "spacing_mm": opts.spacing_mm, "position": opts.position,
               "slice_order": opts.slice_order}
    if opts.postop:
        d |= {"postop": True, "implant_side": opts.implant_side, "fat_infiltration": opts.fat_infiltration,
              "atrophy": opts.atrophy}
    return d


def phantom_plan(n: int, seed_start: int, postop_share: float = 0.25,
                 atrophy_kept_min: float = recipe.ATROPHY_KEPT_MIN) -> list[PhantomOptions]:
    """Varied phantom options: HFS/FFS, several spacings, slice orders, post-op with atrophy + implant.

    Post-operative phantoms take the last ``postop_share * 4`` places of every four (the 4th at
    0.25, the held-out plan), so both positions carry implants and a larger share keeps the
    post-operative phantoms of a smaller one unchanged (their cached volumes stay valid).
    """
    if postop_share not in POSTOP_SHARES:
        raise ValueError(f"postop_share must be one of {POSTOP_SHARES}, not {postop_share}")
    per4 = round(postop_share * 4)
    return [phantom_options(i, seed_start + i, i % 4 >= 4 - per4, atrophy_kept_min) for i in range(n)]


def validation_plan(n: int, seed_start: int) -> list[PhantomOptions]:
    """Validation phantoms, post-operative first and then alternating.

    The post-operative studies (implant, atrophy, fat) are the hardest; a pre-operative-only
    validation set picks checkpoints that are blind to them.
    """
    return [phantom_options(i, seed_start + i, i % 2 == 0) for i in range(n)]


def plan_phantom(opts: PhantomOptions, z_range_mm: tuple[float, float] | None) -> Phantom:
    """The phantom of a plan's options, cut to ``z_range_mm`` when given (small test phantoms): how
    training, evaluation and the GPU legs render them."""
    from seg.phantom import make_phantom

    return make_phantom(opts if z_range_mm is None else replace(opts, z_range_mm=z_range_mm))


def _case_paths(cache: Path, case_id: str) -> dict:
    return {
        "id": case_id,
        "image": str(cache / f"{case_id}_image.npy"),
        "labels": str(cache / f"{case_id}_labels.npy"),
        "fractions": str(cache / f"{case_id}_fractions.npy"),
        "metal": str(cache / f"{case_id}_metal.npy"),
    }


def _is_cached(paths: dict, fractions: bool, source: str | None = None) -> bool:
    """Every file there, and, for a site case, made from the files it has now (``source``)."""
    keys = ("image", "labels", "metal", "fractions") if fractions else ("image", "labels", "metal")
    if not all(Path(paths[k]).exists() for k in keys):
        return False
    record = Path(paths["image"]).with_name(f"{paths['id']}_source.txt")
    return source is None or (record.is_file() and record.read_text() == source)


def cache_case(cache: Path, case_id: str, ct: Volume, labels: Volume, pre: PreprocessConfig,
               fractions: bool = True, source: str | None = None) -> dict:
    """Preprocess one case onto the model grid; store the image (float16), nearest labels (uint8), the
    model-grid voxels holding metal (:func:`metal_voxels`) and, when asked, the partial-volume class
    fractions (uint8 x255, class first) as .npy. ``source``
    (:func:`seg.dataset.case_source`) is recorded beside them: an entry made from other files is made
    again."""
    paths = _case_paths(cache, case_id)
    if not _is_cached(paths, fractions, source):
        mg = to_model_grid(as_configured(ct, pre.metal_artefact_reduction), pre, labels)
        if fractions:
            frac = labels_to_model_probs(labels, mg.affine, mg.image.shape, L.NUM_CLASSES)
            np.save(paths["fractions"], frac)
        np.save(paths["image"], mg.image.astype(np.float16))
        np.save(paths["labels"], mg.labels)
        np.save(paths["metal"], metal_voxels(ct, mg.affine, mg.image.shape))
        if source is not None:
            Path(paths["image"]).with_name(f"{case_id}_source.txt").write_text(source)
    return paths


def metal_voxels(ct: Volume, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Model-grid voxels (N x 3, int16) whose centre is nearest a metal voxel of the CT (the QA's rule,
    :data:`seg.metal_proximity.METAL_HU`), read before any metal artefact reduction: where implant
    crops centre. ``affine`` maps model-grid indices to RAS mm, as :func:`to_model_grid` returns it."""
    idx = np.argwhere(ct.array > METAL_HU)
    if not len(idx):
        return np.zeros((0, 3), np.int16)
    m = np.linalg.inv(affine) @ ct.ras_affine()  # CT index -> model-grid index
    vox = np.rint(idx @ m[:3, :3].T + m[:3, 3]).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < np.array(shape[:3])), axis=1)
    return np.unique(vox[inside], axis=0).astype(np.int16)


def preprocess_config(cfg: TrainConfig) -> PreprocessConfig:
    """The preprocessing a run trains with and exports into its package."""
    return PreprocessConfig(spacing_mm=cfg.spacing_mm, image_resampling=cfg.image_resampling,
                            metal_artefact_reduction=cfg.metal_artefact_reduction)


def _claim_cache(cache: Path, pre: PreprocessConfig) -> None:
    """Refuse a cache folder built with other preprocessing: its file names carry only the case (a
    folder shared between recipes would feed one recipe's images to the other). A folder from
    before this record takes the current preprocessing's record."""
    record = cache / "preprocessing.json"
    want = pre.model_dump(mode="json")
    if record.exists():
        have = json.loads(record.read_text())
        if have != want:
            raise ValueError(f"cache {cache} holds cases preprocessed as {have}, not {want}: "
                             "give this run its own checkpoint folder (its cache lives there)")
    else:
        record.write_text(json.dumps(want, indent=1))


def build_cache(cfg: TrainConfig, pre: PreprocessConfig) -> tuple[list[dict], list[dict], dict]:
    """Cache train and validation cases; returns (train, val, data provenance)."""
    cache = Path(cfg.cache_dir or Path(cfg.checkpoint_dir) / "cache")
    cache.mkdir(parents=True, exist_ok=True)
    _claim_cache(cache, pre)
    cases: list[dict] = []
    fractions = cfg.targets == "partial_volume"
    if cfg.data:
        found = dataset_cases(Path(cfg.data))
        for n, case in enumerate(found.cases, start=1):
            source = case_source(case)
            if _is_cached(_case_paths(cache, case.case), fractions, source):
                cases.append(_case_paths(cache, case.case))
                continue
            ct, lab = load_case(case)
            cases.append(cache_case(cache, case.case, ct, lab, pre, fractions, source))
            log.info("cached %s (%d of %d)", case.case, n, len(found.cases))
        nval = max(1, len(cases) // 10) if len(cases) > 1 else 0
        prov = {"source": "dataset", "data": str(cfg.data), "cases": [c["id"] for c in cases]}
        if found.table is not None:  # the site's numbering, as the labels were read
            prov["label_table"] = {str(r.value): r.structure for r in found.table.rows}
        return cases[nval:], cases[:nval], prov
    plan = (phantom_plan(cfg.phantoms, cfg.seed_start, cfg.postop_share, cfg.atrophy_kept_min)
            + validation_plan(cfg.val_phantoms, cfg.seed_start + cfg.phantoms))
    ids = [phantom_case_id(opts, cfg.phantom_z_range_mm) for opts in plan]
    jobs = [_PhantomJob(str(cache), cid, opts, cfg.phantom_z_range_mm, pre, fractions)
            for cid, opts in zip(ids, plan, strict=True)
            if not _is_cached(_case_paths(cache, cid), fractions)]
    for job, seconds in _run_phantom_jobs(jobs, cfg.cache_workers):
        log.info("cached phantom seed %s (%s, %.1f s)", job.opts.seed, job.opts.position, seconds)
    cases = [_case_paths(cache, cid) | {"postop": opts.postop}
             for cid, opts in zip(ids, plan, strict=True)]
    ntr = cfg.phantoms
    prov = {
        "source": "phantoms",
        "train_seeds": [p.seed for p in plan[:ntr]],
        "val_seeds": [p.seed for p in plan[ntr:]],
        "phantom_options": [plan_record(p) for p in plan],
        "z_range_mm": cfg.phantom_z_range_mm,
        "phantom_version": PHANTOM_VERSION,
    }
    return cases[:ntr], cases[ntr:], prov


@dataclass(frozen=True)
class _PhantomJob:
    """One phantom to render and cache (picklable: it crosses into a worker process)."""

    cache: str
    case_id: str
    opts: PhantomOptions
    z_range: tuple[float, float] | None
    preprocessing: PreprocessConfig
    fractions: bool


def _cache_phantom(job: _PhantomJob) -> float:
    """Render and cache one phantom; returns the seconds it took."""
    t = time.time()
    ph = plan_phantom(job.opts, job.z_range)
    ct, lab = ph.ct, ph.labels
    cache_case(Path(job.cache), job.case_id, ct, lab, job.preprocessing, job.fractions)
    return time.time() - t


def one_thread() -> None:
    """Process initialiser: one torch thread (phantom workers, one core apiece)."""
    torch.set_num_threads(1)


def _run_phantom_jobs(jobs: list[_PhantomJob], workers: int):
    """Yield (job, seconds) as each phantom is cached: in this process, or in ``workers`` processes
    of one thread each (rendering and resampling a phantom is numpy and scipy, one core apiece)."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, _cache_phantom(job)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")  # no fork of a process that may hold torch threads
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=one_thread) as ex:
        yield from zip(jobs, ex.map(_cache_phantom, jobs), strict=True)


def phantom_case_id(opts: PhantomOptions, z_range: tuple[float, float] | None) -> str:
    """A cached phantom's name: its seed and a hash of its options, z range and the generator's
    version (another phantom version renders other images from the same options, so a cache made
    by the old generator is not fed to a run on the new one)."""
    import hashlib

    key = [plan_record(opts), z_range]
    if PHANTOM_VERSION != "1.0":  # version 1.0's cases were named before the version joined the key
        key.append(PHANTOM_VERSION)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return f"ph{opts.seed}_{digest[:8]}"


@dataclass(frozen=True)
class CropPlan:
    """One training crop: which case, where it starts, mirrored or not, and its intensity jitter."""

    case: int
    start: np.ndarray
    flip: bool
    gain: float
    offset: float
    noise_sd: float
    streaks: Streaks | None = None  # metal-streak artefact to add (seg.streaks), if any


class CropPlanner:
    """Draws training crops over cases known only by their shape and centre candidates.

    Mostly centred on labelled voxels (``fg_prob``), some anywhere; post-operative cases weighted
    by ``postop_weight``. The storage cuts the crop: numpy arrays here (:class:`CropSampler`), GPU
    tensors in ``scripts/gpu_leg.py``, so both train on the same crops.
    """

    def __init__(self, roi: tuple[int, int, int], fg_prob: float, flip_x: bool, rng: np.random.Generator,
                 postop_weight: float = 1.0, streak_prob: float = 0.0,
                 spacing_mm: tuple[float, float, float] = (recipe.SPACING_MM,) * 3,
                 implant_prob: float = 0.0):
        if postop_weight <= 0:
            raise ValueError(f"postop_weight must be positive, not {postop_weight}")
        for name, share in (("streak_prob", streak_prob), ("implant_prob", implant_prob)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {share}")
        self.roi, self.fg_prob, self.flip_x, self.rng = np.array(roi), fg_prob, flip_x, rng
        self.postop_weight, self.streak_prob, self.spacing_mm = postop_weight, streak_prob, spacing_mm
        self.implant_prob = implant_prob
        self.shapes: list[np.ndarray] = []  # each case's shape, padded up to the ROI
        self.centres: list[dict[int, np.ndarray]] = []
        self.metal: list[np.ndarray] = []  # each case's metal voxels (N x 3; none without an implant)
        self.weights: list[float] = []
        self.case_p: np.ndarray | None = None  # None: uniform (the old random stream)

    def add(self, shape: tuple[int, ...], centres: dict[int, np.ndarray], postop: bool,
            metal: np.ndarray | None = None) -> None:
        self.shapes.append(np.maximum(np.array(shape), self.roi))
        self.centres.append(centres)
        self.metal.append(np.zeros((0, 3), np.int64) if metal is None else np.asarray(metal, np.int64))
        self.weights.append(self.postop_weight if postop else 1.0)
        w = np.array(self.weights)
        self.case_p = None if np.all(w == w[0]) else w / w.sum()

    def _centre(self, i: int) -> np.ndarray | None:
        groups = self.centres[i]
        if not groups:
            return None
        keys = sorted(groups)
        vox = groups[keys[int(self.rng.integers(len(keys)))]]
        return vox[int(self.rng.integers(len(vox)))]

    def draw(self) -> CropPlan:
        if self.case_p is None:
            i = int(self.rng.integers(len(self.shapes)))
        else:
            i = int(self.rng.choice(len(self.shapes), p=self.case_p))
        shape, roi = self.shapes[i], self.roi
        metal = self.metal[i]
        # The implant test draws from the stream only when implant crops are asked for and the case
        # has metal, so runs without them keep the old stream.
        if self.implant_prob > 0 and len(metal) and self.rng.random() < self.implant_prob:
            c = metal[int(self.rng.integers(len(metal)))]
        else:
            c = self._centre(i) if self.rng.random() < self.fg_prob else None
        if c is not None:
            start = np.clip(c - roi // 2 + self.rng.integers(-roi // 4, roi // 4 + 1), 0, shape - roi)
        else:
            start = np.array([int(self.rng.integers(0, s - r + 1)) for s, r in zip(shape, roi, strict=False)])
        flip = bool(self.flip_x and self.rng.random() < 0.5)  # classes are not lateralised
        # Intensity jitter on the windowed image: contrast, brightness, noise.
        gain, offset = float(self.rng.uniform(0.9, 1.1)), float(self.rng.uniform(-0.05, 0.05))
        noise_sd = float(self.rng.uniform(0.0, 0.03))
        streaks = None  # drawn only when asked for, so the random stream without them stays as it was
        if self.streak_prob > 0 and self.rng.random() < self.streak_prob:
            streaks = draw_streaks(self.rng, tuple(int(r) for r in self.roi), self.spacing_mm)
        return CropPlan(i, start, flip, gain, offset, noise_sd, streaks)


class CropSampler:
    """Random ROI crops from cached cases, as :class:`CropPlanner` draws them.

    Targets are the nearest labels (int64, B×1×ROI) or, with ``fractions``, the partial-volume class
    fractions (float32, B×C×ROI).
    """

    def __init__(
        self,
        cases: list[dict],
        roi: tuple[int, int, int],
        fg_prob: float,
        flip_x: bool,
        rng: np.random.Generator,
        by_class: bool = False,
        fractions: bool = False,
        postop_weight: float = 1.0,
        streak_prob: float = 0.0,
        pre: PreprocessConfig | None = None,
        implant_prob: float = 0.0,
    ):
        if not cases:
            raise ValueError("no training cases")
        if streak_prob > 0 and pre is None:
            raise ValueError("streaks are added in HU: give the preprocessing (pre)")
        self.pre = pre
        self.planner = CropPlanner(roi, fg_prob, flip_x, rng, postop_weight, streak_prob,
                                   pre.spacing_mm if pre is not None else (recipe.SPACING_MM,) * 3,
                                   implant_prob)
        self.images = [np.load(c["image"]) for c in cases]
        self.labels = [np.load(c["labels"]) for c in cases]
        # Fractions are 30x the labels' size (about 31 MB a whole-thigh phantom at 4 mm): mapped, not
        # loaded, so a few hundred cases live in the page cache, which the kernel may reclaim.
        self.fractions = [np.load(c["fractions"], mmap_mode="r") for c in cases] if fractions else None
        # Centre candidates per case and class (every 7th voxel of a class keeps memory small).
        for c, img, lab in zip(cases, self.images, self.labels, strict=True):
            metal = np.load(c["metal"]) if implant_prob > 0 else None
            self.planner.add(img.shape, voxels_by_class(lab, by_class), bool(c.get("postop")), metal)
        self.roi, self.rng = roi, rng

    def _crop(self, a: np.ndarray, start: np.ndarray, fill: float | np.ndarray = 0) -> np.ndarray:
        """ROI crop of the last three axes at ``start``, padded with ``fill`` past the array's end."""
        lead = a.shape[:-3]
        out = np.empty((*lead, *self.roi), dtype=a.dtype)
        out[...] = np.asarray(fill, dtype=a.dtype).reshape(*lead, 1, 1, 1) if lead else fill
        src = tuple(
            slice(int(s), min(int(s) + r, n)) for s, r, n in zip(start, self.roi, a.shape[-3:], strict=True)
        )
        dst = tuple(slice(0, sl.stop - sl.start) for sl in src)
        out[(..., *dst)] = a[(..., *src)]
        return out

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        p = self.planner.draw()
        x = self._crop(self.images[p.case], p.start).astype(np.float32)
        if self.fractions is not None:
            bg = np.zeros(L.NUM_CLASSES, np.uint8)
            bg[0] = 255  # padding is background
            y = self._crop(self.fractions[p.case], p.start, bg).astype(np.float32) / np.float32(255.0)
        else:
            y = self._crop(self.labels[p.case], p.start)[None]
        if p.flip:
            x, y = x[::-1], y[:, ::-1]
        if p.streaks is not None and self.pre is not None:
            x = add_to_windowed(x, streak_field(p.streaks, self.roi), self.pre).astype(np.float32)
        x = x * p.gain + p.offset
        x = x + self.rng.normal(0.0, p.noise_sd, x.shape).astype(np.float32)
        return np.clip(x, 0.0, 1.0), np.ascontiguousarray(y)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(self.sample() for _ in range(n)), strict=False)
        y = np.stack(ys)
        return (
            torch.from_numpy(np.stack(xs)[:, None].copy()),
            torch.from_numpy(y if self.fractions is not None else y.astype(np.int64)),
        )


def voxels_by_class(lab: np.ndarray, by_class: bool) -> dict[int, np.ndarray]:
    """Labelled voxel indices (every 7th), all in one group or one group per class present."""
    flat = np.flatnonzero(lab)
    if not by_class:
        flat = flat[::7]
        return {0: np.stack(np.unravel_index(flat, lab.shape), 1)} if len(flat) else {}
    vals = lab.ravel()[flat]
    order = np.argsort(vals, kind="stable")
    flat, vals = flat[order], vals[order]
    cuts = np.flatnonzero(np.diff(vals)) + 1
    out = {}
    for part in np.split(np.arange(len(flat)), cuts):
        if len(part):
            sel = flat[part][::7]
            out[int(vals[part[0]])] = np.stack(np.unravel_index(sel, lab.shape), 1)
    return out


# ---------------------------------------------------------------- validation


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n: int = L.NUM_CLASSES) -> np.ndarray:
    """Dice per class (NaN where the class is absent from both)."""
    idx = truth.astype(np.int64) * n + pred.astype(np.int64)
    cm = np.bincount(idx.ravel(), minlength=n * n).reshape(n, n)
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


@torch.no_grad()
def predict_model_grid(
    net: torch.nn.Module,
    image: np.ndarray,
    roi: tuple[int, int, int],
    device: torch.device,
    sw_batch: int = 2,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Softmax probabilities (C, X, Y, Z) on the model grid by sliding windows."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(image.astype(np.float32))[None, None]
    out = sliding_window_inference(
        x, roi, sw_batch, net, overlap=overlap, mode="gaussian", sw_device=device, device=torch.device("cpu")
    )
    return torch.softmax(out[0].float(), 0)


def _mean_present(a: np.ndarray) -> np.ndarray:
    """Mean over the first axis of the values that are not NaN (a class absent from every validation
    case, as in small test phantoms, stays NaN, without numpy's empty-slice warning)."""
    n = (~np.isnan(a)).sum(0)
    return np.where(n > 0, np.nansum(a, 0) / np.maximum(n, 1), np.nan)


def validate(net: torch.nn.Module, cases: list[dict], roi: tuple[int, int, int],
             device: torch.device) -> dict:
    net.eval()
    dices = []
    for c in cases:
        p = predict_model_grid(net, np.load(c["image"]), roi, device).argmax(0).numpy()
        dices.append(dice_per_class(p, np.load(c["labels"])))
    net.train()
    d = _mean_present(np.stack(dices)) if dices else np.full(L.NUM_CLASSES, np.nan)
    musc = [L.LABEL_OF[m] for m in L.ANALYSED_MUSCLES]
    return {
        "mean_dice_muscles": float(_mean_present(d[musc])),
        "per_class": {
            L.CLASS_NAMES[i]: (None if np.isnan(d[i]) else round(float(d[i]), 4))
            for i in range(1, L.NUM_CLASSES)
        },
    }


# ---------------------------------------------------------------- training


def learning_rate(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """The schedule: linear warm-up, then linear decay to 5 % after ``decay_start`` of the run."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = elapsed_s / (cfg.max_minutes * 60) if cfg.max_minutes else step / max(cfg.steps, 1)
    if frac > cfg.decay_start:
        return cfg.lr * max(0.05, 1.0 - (frac - cfg.decay_start) / (1.0 - cfg.decay_start))
    return cfg.lr


def _save_ckpt(path: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), **state}, tmp)
    tmp.replace(path)


class InitFromError(ValueError):
    """The package a run starts from (``init_from``) does not load or does not fit the run."""


def _package_weights(cfg: TrainConfig) -> tuple[torch.nn.Module, list[dict]]:
    """The network of package ``cfg.init_from`` (refused unless its architecture and spacing match)
    and the training legs that produced it, so a campaign's steps and hours keep adding up.
    :class:`InitFromError` says what does not fit."""
    try:
        pkg = load_model(cfg.init_from, device="cpu")
    except ModelPackageError as exc:
        raise InitFromError(str(exc)) from exc
    args = pkg.meta.architecture.args
    differ = sorted(k for k in set(args) | set(cfg.arch) if args.get(k) != cfg.arch.get(k))
    if differ:
        raise InitFromError(f"--init-from {cfg.init_from}: architecture differs: " + ", ".join(
            f"{k} {args.get(k)} in the package, {cfg.arch.get(k)} here" for k in differ))
    spacing = tuple(float(v) for v in pkg.preprocess.spacing_mm)
    if spacing != tuple(float(v) for v in cfg.spacing_mm):
        raise InitFromError(f"--init-from {cfg.init_from}: package spacing {spacing} mm, "
                            f"training spacing {tuple(cfg.spacing_mm)} mm")
    return pkg.network, campaign_legs(pkg.meta.provenance)


def campaign_legs(prov: dict) -> list[dict]:
    """The training legs recorded in a package's provenance (one leg for a package that lists none)."""
    legs = (prov.get("campaign") or {}).get("legs")
    if legs:
        return list(legs)
    if prov.get("steps") is None:
        return []
    return [{"steps": int(prov["steps"]), "wall_s": float(prov.get("train_wall_s") or 0.0),
             "hardware": prov.get("hardware"), "init_from": None}]


def _trained(ckdir: Path, exported: dict) -> tuple[int, float]:
    """Steps and wall time this run trained: from last.pt (the exported best.pt may be earlier)."""
    last = ckdir / "last.pt"
    ck = torch.load(last, map_location="cpu", weights_only=False) if last.exists() else exported
    return int(ck["step"]), float(ck["elapsed_s"])


def _campaign(prior: list[dict], steps: int, wall_s: float, init_from: str | None, threads: int) -> dict:
    legs = [*prior, {"steps": steps, "wall_s": round(wall_s, 1), "hardware": _hardware(threads),
                     "init_from": init_from}]
    return {"legs": legs, "total_steps": sum(int(g["steps"]) for g in legs),
            "total_wall_s": round(sum(float(g["wall_s"]) for g in legs), 1)}


def training_uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether the forward pass runs under bf16 autocast (``precision``: auto, fp32 or bf16)."""
    if precision not in recipe.PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(recipe.PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from seg.runtime import cpu_has_bf16

    return cpu_has_bf16()


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn, x: torch.Tensor,
               y: torch.Tensor, bf16: bool) -> torch.Tensor:
    """One optimiser step (forward under bf16 autocast where asked, loss in fp32, gradients
    clipped to norm 1); returns the loss, detached, without waiting for it."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(x)
    loss = loss_fn(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    return loss.detach()


@dataclass(frozen=True)
class _Run:
    """The live objects of one training run: where it runs, the network, its optimiser and loss."""

    device: torch.device
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    loss_fn: LossFn
    bf16: bool  # forward pass under bf16 autocast


def _setup(cfg: TrainConfig) -> _Run:
    """Device, network (drawn from the torch seed), AdamW and the configured loss."""
    device = resolve_device(cfg.device)
    net = build_network(Architecture(args=cfg.arch)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bf16 = training_uses_bf16(cfg.precision, device)
    log.info("training precision: %s", "bf16 autocast" if bf16 else "fp32")
    loss_fn = build_loss(cfg.loss, one_hot_labels=cfg.targets != "partial_volume", dice_batch=cfg.dice_batch,
                         class_weights=cfg.class_weights, device=device)
    return _Run(device=device, net=net, opt=opt, loss_fn=loss_fn, bf16=bf16)


def _resume_or_init(run: _Run, last: Path | None, start: tuple[torch.nn.Module, list[dict]] | None,
                    init_from: str | None) -> dict:
    """The checkpointed run state: read from ``last`` (resuming), else fresh, with the weights and
    training legs of the package ``start`` when warm-starting."""
    state = {"step": 0, "elapsed_s": 0.0, "best": -1.0, "best_step": 0, "history": [], "val": None,
             "prior_legs": []}
    if last is not None:
        ck = torch.load(last, map_location=run.device, weights_only=False)
        run.net.load_state_dict(ck["model"])
        run.opt.load_state_dict(ck["optimizer"])
        state = {k: ck.get(k, state[k]) for k in state}
        log.info("resumed from %s at step %d", last, state["step"])
    elif start is not None:
        network, state["prior_legs"] = start
        run.net.load_state_dict(network.state_dict())
        log.info("initialised from the package %s", init_from)
    return state


def _step(cfg: TrainConfig, run: _Run, sampler: CropSampler, step: int, elapsed_s: float) -> float:
    """Set the scheduled learning rate, draw a batch and take one optimiser step; returns the loss."""
    for g in run.opt.param_groups:
        g["lr"] = learning_rate(cfg, step, elapsed_s)
    x, y = sampler.batch(cfg.batch_size)
    x, y = x.to(run.device), y.to(run.device)
    return train_step(run.net, run.opt, run.loss_fn, x, y, run.bf16).item()


def _validate_and_checkpoint(run: _Run, state: dict, run_loss: list[float], val_cases: list[dict], roi,
                             ckdir: Path, val_every: int) -> None:
    """Record a history entry (mean loss, validation Dice where there are validation cases), keep the
    best checkpoint by that score and write the last one."""
    entry = {
        "step": state["step"],
        "elapsed_s": round(state["elapsed_s"], 1),
        "loss": round(float(np.mean(run_loss[-val_every:])), 4),
    }
    if val_cases:
        v = validate(run.net, val_cases, roi, run.device)
        entry["val_mean_dice_muscles"] = round(v["mean_dice_muscles"], 4)
        state["val"] = v
        score = v["mean_dice_muscles"]
    else:
        score = -float(entry["loss"])
    state["history"].append(entry)
    log.info("step %d (%.1f min): loss %.4f%s", state["step"], entry["elapsed_s"] / 60, entry["loss"],
             f", validation Dice {entry['val_mean_dice_muscles']:.4f}" if val_cases else "")
    print(json.dumps(entry), flush=True)  # the same, for programs (history.jsonl keeps it too)
    with open(ckdir / "history.jsonl", "a") as f:  # the learning curve, readable without torch
        f.write(json.dumps(entry) + "\n")
    if score > state["best"]:
        state["best"], state["best_step"] = score, state["step"]
        _save_ckpt(ckdir / "best.pt", run.net, run.opt, state)
    _save_ckpt(ckdir / "last.pt", run.net, run.opt, state)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training; export the best checkpoint as a package to ``cfg.out``.

    The run uses ``cfg.threads`` torch threads; the caller's thread count is put back afterwards
    (a process that trains and then segments would otherwise segment on the training's count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, resume, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, resume: bool, progress: bool) -> Path:
    torch.manual_seed(cfg.seed)
    ckdir = Path(cfg.checkpoint_dir)
    last = ckdir / "last.pt"
    resuming = resume and last.exists()
    # the package to start from, before anything is written or cached: one that does not fit stops here
    start = _package_weights(cfg) if cfg.init_from and not resuming else None
    ckdir.mkdir(parents=True, exist_ok=True)
    (ckdir / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=list))
    pre = preprocess_config(cfg)
    roi = tuple(int(v) for v in cfg.arch["img_size"])
    t_cache = time.time()
    train_cases, val_cases, data_prov = build_cache(cfg, pre)
    log.info(
        "cache ready: %d train, %d val cases (%.0f s)",
        len(train_cases),
        len(val_cases),
        time.time() - t_cache,
    )
    run = _setup(cfg)
    state = _resume_or_init(run, last if resuming else None, start, cfg.init_from)
    rng = np.random.default_rng(cfg.seed + state["step"])
    sampler = CropSampler(
        train_cases, roi, cfg.fg_crop_prob, cfg.flip_x, rng, by_class=cfg.crop == "classes",
        fractions=cfg.targets == "partial_volume", postop_weight=cfg.postop_weight,
        streak_prob=cfg.streak_prob, pre=pre, implant_prob=cfg.implant_crop_prob,
    )
    t0 = time.time() - state["elapsed_s"]
    t_ck = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=state["step"], desc="train", mininterval=5)
    run.net.train()
    run_loss: list[float] = []
    while state["step"] < cfg.steps:
        if cfg.max_minutes is not None and time.time() - t0 > cfg.max_minutes * 60:
            log.info("time limit reached at step %d", state["step"])
            break
        run_loss.append(_step(cfg, run, sampler, state["step"], time.time() - t0))
        state["step"] += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(run_loss[-20:]):.3f}", refresh=False)  # mininterval holds
        state["elapsed_s"] = time.time() - t0
        done = state["step"] >= cfg.steps or (
            cfg.max_minutes is not None and state["elapsed_s"] > cfg.max_minutes * 60
        )
        if state["step"] % cfg.val_every == 0 or done:
            _validate_and_checkpoint(run, state, run_loss, val_cases, roi, ckdir, cfg.val_every)
            t_ck = time.time()
        elif time.time() - t_ck > cfg.checkpoint_minutes * 60:
            _save_ckpt(last, run.net, run.opt, state)
            t_ck = time.time()
    _save_ckpt(last, run.net, run.opt, state)
    if bar is not None:
        bar.close()
    return export(cfg, data_prov)


def export(cfg: TrainConfig, data_prov: dict | None = None, checkpoint: str = "best") -> Path:
    """Write the package from a checkpoint (best by validation, else last)."""
    ckdir = Path(cfg.checkpoint_dir)
    path = ckdir / f"{checkpoint}.pt"
    if not path.exists():
        path = ckdir / "last.pt"
    ck = torch.load(path, map_location="cpu", weights_only=False)
    net = build_network(Architecture(args=cfg.arch))
    net.load_state_dict(ck["model"])
    if data_prov is None:
        pre = preprocess_config(cfg)
        data_prov = build_cache(cfg, pre)[2]
    prov = {
        "trained_on": data_prov,
        "steps": ck["step"],
        "exported_step": ck["step"],
        "best_step": ck.get("best_step"),
        "train_wall_s": round(float(ck["elapsed_s"]), 1),
        "hardware": _hardware(cfg.threads),
        "validation": ck.get("val"),
        "history": ck.get("history", []),  # the whole leg: the campaign curve is rebuilt from it
        # every leg of the campaign: earlier packages warm-started from (--init-from) and this run
        "campaign": _campaign(ck.get("prior_legs", []), *_trained(ckdir, ck), cfg.init_from, cfg.threads),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out", "checkpoint_dir", "cache_dir")},
        "torch": torch.__version__,
    }
    try:
        import monai

        prov["monai"] = monai.__version__
    except ImportError:  # pragma: no cover
        pass
    pre = preprocess_config(cfg)
    out = save_package(
        cfg.out,
        net,
        name=cfg.name,
        version=cfg.version,
        arch_args=dict(cfg.arch),
        preprocess=pre,
        roi_size=tuple(cfg.arch["img_size"]),
        demo=cfg.demo,
        provenance=prov,
        inference=_inference_requests(cfg),
    )
    log.info("package written to %s", out)
    return out


EXPORTED_HU_REFINEMENT = HURefinement(claim_max_background=0.8, metal_slice_cut_min_background=0.1)


def _inference_requests(cfg: TrainConfig) -> InferenceOptions:
    """What the exported package asks of inference.

    Mirrored crops in training: each window averaged with its mirror (+0.003 held-out Dice). The
    targets are the project's labels (fat is background, as in the paper): the label edges are
    re-decided by the CT number at full resolution (:mod:`seg.hu_refine`, +0.04 on phantoms), and a
    muscle claims a voxel the network called background only where the network's background
    probability is below 0.8 (vessels and bowel beside a muscle stay out; docs/models.md, 0.8.1); in
    the slices holding metal a muscle voxel is cut as fat only where that probability is at least 0.1
    (the streaks left there are not fat; docs/models.md, 0.9.2).
    """
    return InferenceOptions(hu_refinement=EXPORTED_HU_REFINEMENT, mirror_x=cfg.flip_x)


def _cpu_model() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _hardware(threads: int | None = None) -> str:
    """Where a run trained: CPU model, CPUs visible, the run's torch threads, GPU if any."""
    import os

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{_cpu_model()}, {os.cpu_count()} logical CPUs visible, "
            f"{threads or torch.get_num_threads()} torch threads, {dev}")
