"""Accuracy of a model against labelled CT: per-class Dice, HD95 (MONAI), relative volume error.

Metrics are computed on the CT's own grid (what the node measures), per case, then averaged over
cases. The headline figure is the mean Dice over the paper's 21 analysed muscles.
"""

from __future__ import annotations

import csv
import logging
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from seg import labels as L
from seg.records import (
    CaseClassScore,
    CaseEvaluation,
    ClassEvaluation,
    Evaluation,
    EvaluationTargets,
    ModelInfo,
    MuscleLoss,
    NamedDice,
)
from seg.volume import Volume

if TYPE_CHECKING:
    from seg.model import ModelPackage
    from seg.phantom import Phantom, PhantomOptions

log = logging.getLogger(__name__)

TARGETS = EvaluationTargets()
Sides = dict[tuple[str, str], float]  # (structure, "left"|"right") -> cm³


def _hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float]) -> float | None:
    """95 % Hausdorff distance in mm (MONAI), on the two masks' common bounding box."""
    if not pred.any() or not truth.any():
        return None
    import torch
    from monai.metrics import compute_hausdorff_distance

    both = pred | truth
    idx = np.argwhere(both)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = idx.max(0) + 3
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=False))
    p = torch.from_numpy(np.ascontiguousarray(pred[sl]))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(truth[sl]))[None, None]
    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated get_mask_edges(always_return_as_numpy=...) inside
        # compute_hausdorff_distance: a FutureWarning per call that says nothing to our users.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        d = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=list(spacing))
    return float(d.reshape(-1)[0])


def evaluate_case(pred: Volume, truth: Volume, hd95: bool = True,
                  sides: tuple[Sides, Sides] | None = None) -> CaseEvaluation:
    """Per-class Dice, HD95 (mm) and relative volume error (%) of one prediction. ``sides``: the
    (prediction's, truth's) :func:`side_volumes` when the caller has them already."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} are not on one grid")
    n = L.NUM_CLASSES
    p = np.asarray(pred.array, dtype=np.int64)
    t = np.asarray(truth.array, dtype=np.int64)
    cm = np.bincount((t * n + p).ravel(), minlength=n * n).reshape(n, n)
    tp = np.diag(cm)
    npred, ntrue = cm.sum(0), cm.sum(1)
    vox = truth.voxel_volume_cm3
    pred_sides, true_sides = sides or (side_volumes(pred), side_volumes(truth))
    by_side = _side_volume_errors(pred_sides, true_sides)
    out: dict[str, CaseClassScore] = {}
    for lab in range(1, n):
        name = L.CLASS_NAMES[lab]
        if ntrue[lab] == 0 and npred[lab] == 0:
            continue
        out[name] = CaseClassScore(
            dice=float(2.0 * tp[lab] / (npred[lab] + ntrue[lab])),
            volume_true_cm3=float(ntrue[lab] * vox),
            volume_pred_cm3=float(npred[lab] * vox),
            volume_error_pct=float((npred[lab] - ntrue[lab]) / ntrue[lab] * 100.0) if ntrue[lab] else None,
            hd95_mm=_hd95(pred.array == lab, truth.array == lab, truth.spacing_mm) if hd95 else None,
            side_volume_error_pct=by_side.get(name, {}),
        )
    musc = [m for m in L.ANALYSED_MUSCLES if m in out]
    tv = sum(out[m].volume_true_cm3 for m in musc)
    pv = sum(out[m].volume_pred_cm3 for m in musc)
    return CaseEvaluation(
        per_class=out,
        mean_dice_muscles=float(np.mean([out[m].dice for m in musc])) if musc else None,
        total_muscle_volume_true_cm3=tv,
        total_muscle_volume_pred_cm3=pv,
        total_muscle_volume_error_pct=(pv - tv) / tv * 100.0 if tv else None,
    )


def _side_volume_errors(pred: Sides, truth: Sides) -> dict[str, dict[str, float]]:
    """Relative volume error (%) of each structure per side, each label map split at its own
    mid-sagittal plane as the node splits a prediction (:func:`side_volumes`)."""
    out: dict[str, dict[str, float]] = {}
    for (name, side), want in truth.items():
        if want > 0:
            out.setdefault(name, {})[side] = (pred[(name, side)] - want) / want * 100.0
    return out


def dice_by_side(pred: Volume, truth: Volume) -> dict[tuple[str, str], float]:
    """Dice of each structure on each side of the patient, split at the truth's mid-sagittal plane.

    Keys (name, "left"|"right"); a structure absent from both on one side is left out.
    """
    from seg.measure import _world_x_slice, midline_x

    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} are not on one grid")
    n = L.NUM_CLASSES
    mid, _ = midline_x(truth)
    cm = np.zeros((2, n, n), np.int64)  # side (0 right, 1 left), truth, prediction
    for k in range(truth.shape[2]):
        t = np.asarray(truth.array[:, :, k], np.int64)
        p = np.asarray(pred.array[:, :, k], np.int64)
        left = (_world_x_slice(truth.affine, t.shape, k) > mid).astype(np.int64)
        cm += np.bincount(((left * n + t) * n + p).ravel(), minlength=2 * n * n).reshape(2, n, n)
    out = {}
    for side_i, side in ((0, "right"), (1, "left")):
        m = cm[side_i]
        tp, npred, ntrue = np.diag(m), m.sum(0), m.sum(1)
        for lab in range(1, n):
            if npred[lab] + ntrue[lab]:
                out[(L.CLASS_NAMES[lab], side)] = float(2.0 * tp[lab] / (npred[lab] + ntrue[lab]))
    return out


def _mean(vals: list) -> float | None:
    v = [x for x in vals if x is not None]
    return float(np.mean(v)) if v else None


def aggregate(cases: list[CaseEvaluation], model_info: ModelInfo,
              atrophy_loss: list[MuscleLoss] | None = None,
              unshrunk_loss: list[MuscleLoss] | None = None) -> Evaluation:
    """Average per-class figures over cases into the evaluation.json record."""
    per_class: dict[str, ClassEvaluation] = {}
    for name in L.CLASS_NAMES[1:]:
        recs = [c.per_class[name] for c in cases if name in c.per_class]
        if not recs:
            continue
        errs = [r.volume_error_pct for r in recs if r.volume_error_pct is not None]
        sides = [abs(e) for r in recs for e in r.side_volume_error_pct.values()]
        pre = [abs(e) for c in cases if not c.postoperative and name in c.per_class
               for e in c.per_class[name].side_volume_error_pct.values()]
        per_class[name] = ClassEvaluation(
            dice=_mean([r.dice for r in recs]),
            max_abs_side_volume_error_pct=max(sides) if sides else None,
            max_abs_side_volume_error_pct_preop=max(pre) if pre else None,
            hd95_mm=_mean([r.hd95_mm for r in recs]),
            volume_error_pct=_mean(errs),
            abs_volume_error_pct=_mean([abs(e) for e in errs]),
            group=L.by_name(name).group,
            analysed=L.by_name(name).analysed,
        )
    musc = [m for m in L.ANALYSED_MUSCLES if m in per_class]
    dices = [per_class[m].dice for m in musc]
    abs_err = [e for m in musc if (e := per_class[m].abs_volume_error_pct) is not None]
    tot = [c.total_muscle_volume_error_pct for c in cases if c.total_muscle_volume_error_pct is not None]
    loss = atrophy_loss or []

    def dice_of(name: str) -> float | None:
        return per_class[name].dice if name in per_class else None

    return Evaluation(
        model=model_info,
        cases=len(cases),
        mean_dice_muscles=float(np.mean(dices)) if dices else None,
        min_dice_muscle=(NamedDice(name=musc[int(np.argmin(dices))], dice=float(min(dices)))
                         if dices else None),
        femur_dice=dice_of("femur"),
        iliac_bone_dice=dice_of("iliac_bone"),
        total_muscle_volume_error_pct=_mean(tot),
        total_muscle_abs_volume_error_pct=_mean([abs(v) for v in tot]),
        median_abs_muscle_volume_error_pct=float(np.median(abs_err)) if abs_err else None,
        per_class=per_class,
        per_case=tuple(c.summary() for c in cases),
        atrophy_loss=tuple(loss),
        max_atrophy_loss_error_pp=max(abs(a.error_pp) for a in loss) if loss else None,
        unshrunk_loss=tuple(unshrunk_loss or ()),
        targets=TARGETS,
    )


# Every third held-out phantom is written as DICOM in one of these (lossless) syntaxes and read back
# through the node's own loader, so the evaluation covers decoding and geometry from the headers.
COMPRESSED_SYNTAXES = ("rle", "jpegls", "j2k")


def _through_dicom(ph: Phantom, syntax: str) -> Volume:
    import tempfile

    from seg.io import load_dicom_series
    from seg.phantom import write_phantom

    with tempfile.TemporaryDirectory(prefix="dicomnode-eval-") as d:
        write_phantom(ph, d, syntax)
        ct = load_dicom_series(Path(d) / "dicom")
    if ct.shape != ph.ct.shape or not np.allclose(ct.affine, ph.ct.affine, atol=1e-3):
        raise RuntimeError(f"seed {ph.options.seed}: the DICOM read back is not on the phantom's grid")
    return ct


def evaluate_model(
    model: ModelPackage,
    phantoms: int = 0,
    seed_start: int = 5000,
    data: Path | None = None,
    z_range_mm: tuple[float, float] | None = None,
    hd95: bool = True,
    hu_refinement: bool = True,
) -> Evaluation:
    """Segment each held-out case with ``model`` and compare with its truth (``hu_refinement=False``:
    the network's labels alone, see :func:`seg.infer.segment`)."""
    from seg.infer import segment

    cases = []
    if data is not None:
        from seg.dataset import check_labels, dataset_cases, load_case

        found = dataset_cases(data).cases
        for case in found:  # every label map readable, on its CT's grid and of known values before the
            check_labels(case)  # first inference (the CTs' pixels unread): a bad last case would end
        # the run with nothing written; each CT is then read once, as its case is segmented
        items = [(case.case, lambda case=case: load_case(case), None) for case in found]
    else:
        from seg.train import phantom_plan, plan_phantom

        def _mk(o: PhantomOptions, syntax: str | None):
            ph = plan_phantom(o, z_range_mm)
            if syntax is None:
                return ph.ct, ph.labels
            return _through_dicom(ph, syntax), ph.labels

        items = []
        for i, o in enumerate(phantom_plan(phantoms, seed_start)):  # held out: seeds apart from training's
            syntax = COMPRESSED_SYNTAXES[(i // 3) % len(COMPRESSED_SYNTAXES)] if i % 3 == 2 else None
            cid = (f"seed{o.seed}_{o.position}_{'x'.join(f'{s:g}' for s in o.spacing_mm)}"
                   + ("_postop" if o.postop else "") + (f"_{syntax}" if syntax else ""))
            items.append((cid, lambda o=o, syntax=syntax: _mk(o, syntax), o))
    loss: list[MuscleLoss] = []
    unshrunk: list[MuscleLoss] = []
    for n, (cid, load, opts) in enumerate(items, 1):
        ct, truth = load()
        truth = ct.with_array(np.asarray(truth.array).astype(np.uint8))
        t = time.perf_counter()
        pred = segment(ct, model, hu_refinement=hu_refinement)
        dt = time.perf_counter() - t
        sides = (side_volumes(pred), side_volumes(truth))  # measured once: the errors and the atrophy loss
        rec = CaseEvaluation.model_validate(
            evaluate_case(pred, truth, hd95=hd95, sides=sides).model_dump()
            | {"case": cid, "shape": ct.shape, "spacing_mm": ct.spacing_mm, "inference_s": round(dt, 2),
               "postoperative": opts is not None and opts.postop})
        log.info("case %d/%d %s: mean muscle Dice %.4f (%.1f s)", n, len(items), cid,
                 rec.mean_dice_muscles or 0.0, dt)
        cases.append(rec)
        if opts is not None and opts.postop and opts.atrophy and opts.implant_side:
            atrophied, others = _pair_losses(model, opts, z_range_mm, sides, hu_refinement)
            loss += atrophied
            unshrunk += others
    return aggregate(cases, model.info, loss, unshrunk)


def side_volumes(labels: Volume) -> dict[tuple[str, str], float]:
    """Per-side volumes, split at the label map's own mid-sagittal plane as the node splits them."""
    from seg.measure import measure_volumes

    rec = measure_volumes(labels)
    return {(st.name, side): st.side_volume(side) for st in rec.structures for side in ("left", "right")}


def preop_twin_options(post_opts: PhantomOptions) -> PhantomOptions:
    """The pre-operative twin of a post-operative phantom: the same patient (seed, spacing,
    position, slice order) without surgery, atrophy or fat infiltration."""
    return replace(post_opts, postop=False, atrophy={}, implant_side=None, fat_infiltration=0.0)


def atrophy_loss_records(post_opts: PhantomOptions, pre: tuple[Sides, Sides],
                         post: tuple[Sides, Sides]) -> list[MuscleLoss]:
    """Pre->post loss (%) of each atrophied muscle on the operated side, measured against truth.

    ``pre`` and ``post``: (measured, true) side volumes of the pre-operative twin and of the
    post-operative case.
    """
    side = post_opts.implant_side
    found = (_loss_record(post_opts, name, side, pre, post) for name in post_opts.atrophy if side)
    return [r for r in found if r is not None]


def unshrunk_loss_records(post_opts: PhantomOptions, pre: tuple[Sides, Sides],
                          post: tuple[Sides, Sides]) -> list[MuscleLoss]:
    """The same for every analysed muscle the phantom does not shrink (the other side's, and the
    operated side's not atrophied): the loss a reader would wrongly take for atrophy."""
    shrunk = {(name, post_opts.implant_side) for name in post_opts.atrophy}
    found = (_loss_record(post_opts, name, side, pre, post)
             for name in L.ANALYSED_MUSCLES for side in ("left", "right") if (name, side) not in shrunk)
    return [r for r in found if r is not None]


def _loss_record(post_opts: PhantomOptions, name: str, side: str, pre: tuple[Sides, Sides],
                 post: tuple[Sides, Sides]) -> MuscleLoss | None:
    """One muscle's measured and true loss; None where the truth lacks it. A muscle the network
    lost before surgery counts as a 100-point error."""
    (mp, tp), (mq, tq) = pre, post
    key = (name, side)
    if not tp.get(key):
        return None
    true_loss = (tp[key] - tq.get(key, 0.0)) / tp[key] * 100.0
    meas_loss = (mp[key] - mq.get(key, 0.0)) / mp[key] * 100.0 if mp.get(key) else None
    return MuscleLoss(
        case=f"seed{post_opts.seed}", muscle=name, side=side,
        truth_loss_pct=round(true_loss, 2),
        measured_loss_pct=None if meas_loss is None else round(meas_loss, 2),
        error_pp=100.0 if meas_loss is None else round(meas_loss - true_loss, 2),
    )


def _pair_losses(model, post_opts: PhantomOptions, z_range_mm: tuple[float, float] | None,
                 post: tuple[Sides, Sides], hu_refinement: bool = True
                 ) -> tuple[list[MuscleLoss], list[MuscleLoss]]:
    """:func:`atrophy_loss_records` and :func:`unshrunk_loss_records` of a post-operative case, its
    twin segmented here by ``model``."""
    from seg.infer import segment
    from seg.train import plan_phantom

    ph = plan_phantom(preop_twin_options(post_opts), z_range_mm)
    truth = ph.ct.with_array(np.asarray(ph.labels.array).astype(np.uint8))
    pre = (side_volumes(segment(ph.ct, model, hu_refinement=hu_refinement)), side_volumes(truth))
    out = atrophy_loss_records(post_opts, pre, post)
    for r in out:
        log.info("%s %s %s: loss %s %% (truth %.1f %%)", r.case, r.muscle, r.side,
                 "-" if r.measured_loss_pct is None else f"{r.measured_loss_pct:.1f}", r.truth_loss_pct)
    return out, unshrunk_loss_records(post_opts, pre, post)


def format_table(res: Evaluation) -> str:
    """Plain-text table under 80 columns: one row per class (display names, as a reader says them),
    then the summary figures."""
    lines = [f"{'structure':<24}{'group':<10}{'Dice':>8}{'HD95 mm':>9}{'vol err %':>11}"]
    for name, r in res.per_class.items():
        hd = "-" if r.hd95_mm is None else f"{r.hd95_mm:.1f}"
        ve = "-" if r.volume_error_pct is None else f"{r.volume_error_pct:+.1f}"
        lines.append(f"{_display(name):<24}{r.group or '':<10}{r.dice:>8.3f}{hd:>9}{ve:>11}")

    def f(v: float | None, fmt: str = ".3f") -> str:
        return "-" if v is None else format(v, fmt)

    mn, tg = res.min_dice_muscle, res.targets
    if res.model.metal_artefact_reduction != "none":  # a preprocessing step the reader should know
        lines.append(f"metal artefact reduction: {res.model.metal_artefact_reduction}")
    lines += [
        f"cases: {res.cases}",
        f"mean Dice, {len(L.ANALYSED_MUSCLES)} muscles: {f(res.mean_dice_muscles)} "
        f"(target >= {tg.mean_dice_muscles})",
        f"lowest muscle Dice: {_display(mn.name) if mn else '-'} {f(mn.dice if mn else None)} "
        f"(target >= {tg.min_dice_muscle})",
        f"femur Dice {f(res.femur_dice)}, iliac bone Dice {f(res.iliac_bone_dice)} "
        f"(target >= {tg.bone_dice})",
        f"total muscle volume error: {f(res.total_muscle_volume_error_pct, '+.2f')} % mean, "
        f"{f(res.total_muscle_abs_volume_error_pct, '.2f')} % mean abs "
        f"(target <= {tg.total_muscle_volume_error_pct:g} %)",
        f"median abs per-muscle volume error: {f(res.median_abs_muscle_volume_error_pct, '.2f')} % "
        f"(target <= {tg.median_abs_muscle_volume_error_pct:g} %)",
    ]
    if res.atrophy_loss:
        errors = [abs(a.error_pp) for a in res.atrophy_loss]
        within = sum(e <= tg.atrophy_loss_error_pp for e in errors)
        lines += [
            f"atrophied muscles, pre->post loss: {len(errors)}, error median "
            f"{f(float(np.median(errors)), '.1f')}, max {f(res.max_atrophy_loss_error_pp, '.1f')} points",
            f"  within {tg.atrophy_loss_error_pp:g} points: {within} of {len(errors)} (target: all)",
        ]
    if res.unshrunk_loss:  # no target of its own: what a false loss looks like on the same pairs
        errors = [abs(a.error_pp) for a in res.unshrunk_loss]
        within = sum(e <= tg.atrophy_loss_error_pp for e in errors)
        worst = max(res.unshrunk_loss, key=lambda a: abs(a.error_pp))
        lines += [
            f"muscles not shrunk, pre->post loss: {len(errors)}, error median "
            f"{float(np.median(errors)):.1f}, max {abs(worst.error_pp):.1f} points",
            f"  within {tg.atrophy_loss_error_pp:g} points: {within} of {len(errors)}; worst: "
            f"{_display(worst.muscle)} {worst.side}, {worst.case}",
        ]
    return "\n".join(lines)


def _display(name: str) -> str:
    """A class's display name (seg/structures.csv); the name itself for one the table lacks."""
    try:
        return L.by_name(name).display_name
    except KeyError:
        return name


CSV_COLUMNS = ("name", "group", "analysed", "dice", "hd95_mm", "volume_error_pct", "abs_volume_error_pct")


def write_evaluation(res: Evaluation, out_dir: Path | str) -> tuple[Path, Path]:
    """evaluation.json (the full record) and evaluation.csv (one row per class)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp = res.save(out / "evaluation.json")
    cp = out / "evaluation.csv"
    with open(cp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for name, r in res.per_class.items():
            w.writerow([name, r.group, int(r.analysed), r.dice, r.hd95_mm, r.volume_error_pct,
                        r.abs_volume_error_pct])
    return jp, cp
