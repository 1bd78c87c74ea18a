"""Evaluation metrics on hand-made predictions with known overlap."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from seg import labels as L
from seg.evaluate import aggregate, evaluate_case, format_table, write_evaluation
from seg.records import (
    SCHEMA_VERSION,
    ChangeRecord,
    Evaluation,
    ModelInfo,
    StructureChange,
    StructureVolume,
    VolumeRecord,
)
from seg.volume import Volume

SP = (2.0, 2.0, 3.0)


def _vol(arr: np.ndarray) -> Volume:
    return Volume(arr, np.diag([*SP, 1.0]))


def _pair() -> tuple[Volume, Volume]:
    truth = np.zeros((40, 40, 20), np.uint8)
    pred = np.zeros_like(truth)
    s = L.LABEL_OF["sartorius"]
    truth[5:15, 5:15, 5:15] = s  # 1000 voxels
    pred[7:17, 5:15, 5:15] = s  # shifted 2 voxels in x: overlap 800
    f = L.LABEL_OF["femur"]
    truth[20:30, 20:30, 2:12] = f  # 1000 voxels
    pred[20:30, 20:30, 2:7] = f  # 500 voxels, all inside the truth
    g = L.LABEL_OF["gracilis"]
    truth[32:36, 32:36, 0:5] = g  # 80 voxels, missed entirely
    return _vol(pred), _vol(truth)


def test_known_overlap_gives_exact_dice_and_volume_error() -> None:
    pred, truth = _pair()
    r = evaluate_case(pred, truth)
    pc = r.per_class
    assert pc["sartorius"].dice == pytest.approx(2 * 800 / 2000, abs=1e-12)
    assert pc["sartorius"].volume_error_pct == pytest.approx(0.0)
    assert pc["femur"].dice == pytest.approx(2 * 500 / 1500, abs=1e-12)
    assert pc["femur"].volume_error_pct == pytest.approx(-50.0)
    assert pc["gracilis"].dice == 0.0 and pc["gracilis"].hd95_mm is None
    assert pc["gracilis"].volume_error_pct == pytest.approx(-100.0)
    # 4 mm shift along x: the 95th-percentile surface distance is the shift
    assert pc["sartorius"].hd95_mm == pytest.approx(4.0, abs=0.01)
    assert pc["femur"].volume_true_cm3 == pytest.approx(1000 * 0.012)
    # mean over the analysed muscles present (sartorius, gracilis)
    assert r.mean_dice_muscles == pytest.approx((0.8 + 0.0) / 2)
    assert r.total_muscle_volume_error_pct == pytest.approx((1000 - 1080) / 1080 * 100)


def test_aggregate_and_files(tmp_path: Path) -> None:
    pred, truth = _pair()
    c1 = evaluate_case(pred, truth)
    c2 = evaluate_case(truth, truth)
    res = aggregate([c1, c2], ModelInfo(name="m", version="1", demo=True))
    assert res.cases == 2
    assert res.per_class["sartorius"].dice == pytest.approx(0.9)
    assert res.mean_dice_muscles == pytest.approx((0.9 + 0.5) / 2)
    assert (res.min_dice_muscle.name, res.min_dice_muscle.dice) == ("gracilis", pytest.approx(0.5))
    assert res.femur_dice == pytest.approx((2 / 3 + 1) / 2)
    jp, cp = write_evaluation(res, tmp_path)
    data = json.loads(jp.read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["model"]["name"] == "m"
    assert set(data["per_class"]["femur"]) >= {"dice", "hd95_mm", "volume_error_pct"}
    assert "per_class" not in data["per_case"][0]  # per case: its totals only
    assert Evaluation.load(jp) == res
    rows = list(csv.DictReader(cp.open()))
    assert {r["name"] for r in rows} == {"sartorius", "femur", "gracilis"}
    assert "mean Dice, 21 muscles: 0.700" in format_table(res)


def test_pre_operative_worst_side_error_leaves_out_post_operative_cases() -> None:
    pred, truth = _pair()
    pre = evaluate_case(truth, truth).model_copy(update={"postoperative": False})
    post = evaluate_case(pred, truth).model_copy(update={"postoperative": True})
    res = aggregate([pre, post], ModelInfo(name="m", version="1", demo=True))
    femur = res.per_class["femur"]
    assert femur.max_abs_side_volume_error_pct == pytest.approx(50.0)  # the post-op case's half femur
    assert femur.max_abs_side_volume_error_pct_preop == pytest.approx(0.0)
    only_post = aggregate([post], ModelInfo(name="m", version="1", demo=True))
    assert only_post.per_class["femur"].max_abs_side_volume_error_pct_preop is None


def test_the_shipped_evaluation_loads_and_saves_the_same_json(tmp_path: Path) -> None:
    """The demo package's evaluation.json reads as a record and writes back the same keys and values; so
    does its version-less form (what packages before schema_version shipped), plus ``schema_version``."""
    from seg.package import DEMO_DIR

    shipped = json.loads((DEMO_DIR / "evaluation.json").read_text())
    legacy = {k: v for k, v in shipped.items() if k != "schema_version"}
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    for source, expected in ((DEMO_DIR / "evaluation.json", shipped), (tmp_path / "legacy.json", legacy)):
        ev = Evaluation.load(source)
        assert ev.per_class["femur"].dice == shipped["per_class"]["femur"]["dice"]
        written = json.loads(ev.save(tmp_path / "evaluation.json").read_text())
        assert written["schema_version"] == SCHEMA_VERSION
        if "schema_version" not in expected:
            written.pop("schema_version")
        assert written == expected
        assert list(written) == list(expected)


def test_an_evaluation_with_a_misspelt_key_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="mean_dice_muscle"):
        Evaluation.from_json({"cases": 1, "mean_dice_muscle": 0.9})
    with pytest.raises(ValidationError, match="dice"):
        Evaluation.from_json({"per_class": {"femur": {"dic": 0.9}}})


def test_dice_by_side_splits_at_the_midline() -> None:
    from seg.evaluate import dice_by_side

    truth = np.zeros((60, 20, 10), np.uint8)
    f, s = L.LABEL_OF["femur"], L.LABEL_OF["sartorius"]
    truth[5:15, 5:15, :] = f  # right femur (low x in LPS = patient's right)
    truth[45:55, 5:15, :] = f  # left femur
    truth[2:5, 5:15, :] = s  # right sartorius
    truth[55:58, 5:15, :] = s  # left sartorius
    pred = truth.copy()
    pred[55:58, 5:15, 5:] = 0  # half of the left sartorius missed
    d = dice_by_side(_vol(pred), _vol(truth))
    assert d[("sartorius", "right")] == pytest.approx(1.0)
    assert d[("sartorius", "left")] == pytest.approx(2 * 150 / 450)
    assert d[("femur", "left")] == d[("femur", "right")] == pytest.approx(1.0)
    assert ("gracilis", "left") not in d


def test_demo_tables_fit_80_columns() -> None:
    """The demo's per-muscle tables use display names and stay within 80 columns."""
    from dicomnode.commands.demo import change_table, volume_table

    rec = VolumeRecord(structures=tuple(
        StructureVolume(label=L.LABEL_OF[m], name=m, volume_cm3=1334.4, left_cm3=1234.5, right_cm3=99.9)
        for m in L.ANALYSED_MUSCLES))
    dice = {(m, side): 0.987 for m in L.ANALYSED_MUSCLES for side in ("left", "right")}
    text = volume_table("pre-op: volumes", rec, rec, dice)
    change = ChangeRecord(structures=tuple(
        StructureChange(label=L.LABEL_OF[m], name=m, side=side, change_pct=-12.3 if side == "left" else -0.04)
        for m in L.ANALYSED_MUSCLES for side in ("left", "right")))
    text2 = change_table(change, {"gluteus_medius": 0.8}, "left")
    for t in (text, text2):
        assert max(len(line) for line in t.splitlines()) <= 80
    assert "Tensor fasciae latae" in text and "vastus_" not in text
    assert "mean Dice over the 21 muscles, both sides: 0.987" in text
    assert "Gluteus medius" in text2 and "-20 L" in text2 and "-12.3" in text2
    assert " 0.0" in text2 and "-0.0" not in text2 and "+0.0" not in text2  # no sign on a zero change


def test_atrophy_loss_records_measure_loss_against_truth() -> None:
    """Loss = (pre - post) / pre on the operated side; error = measured - true loss, in points; a muscle the
    network lost before surgery counts as a 100-point error, one absent from the truth is left out."""
    from seg.evaluate import atrophy_loss_records, unshrunk_loss_records
    from seg.phantom import PhantomOptions

    opts = PhantomOptions(seed=7, postop=True, implant_side="left",
                          atrophy={"sartorius": 0.8, "gracilis": 0.8, "pectineus": 0.8, "piriformis": 0.8})
    true_pre = {("sartorius", "left"): 100.0, ("gracilis", "left"): 50.0, ("pectineus", "left"): 20.0,
                ("sartorius", "right"): 100.0}
    true_post = {("sartorius", "left"): 80.0, ("gracilis", "left"): 40.0, ("pectineus", "left"): 16.0,
                 ("sartorius", "right"): 100.0}
    meas_pre = {("sartorius", "left"): 110.0, ("gracilis", "left"): 0.0, ("pectineus", "left"): 20.0}
    meas_post = {("sartorius", "left"): 99.0, ("gracilis", "left"): 30.0, ("pectineus", "left"): 17.0}
    recs = {r.muscle: r for r in atrophy_loss_records(opts, (meas_pre, true_pre), (meas_post, true_post))}
    assert sorted(recs) == ["gracilis", "pectineus", "sartorius"]  # piriformis: not in the truth
    s = recs["sartorius"]
    assert (s.case, s.side, s.truth_loss_pct, s.measured_loss_pct, s.error_pp) == (
        "seed7", "left", 20.0, 10.0, -10.0)
    assert recs["gracilis"].measured_loss_pct is None and recs["gracilis"].error_pp == 100.0
    assert recs["pectineus"].error_pp == pytest.approx(-5.0)

    others = {(r.muscle, r.side): r for r in unshrunk_loss_records(opts, (meas_pre, true_pre),
                                                                   (meas_post, true_post))}
    assert list(others) == [("sartorius", "right")]  # the operated side's atrophied ones are not here
    right = others["sartorius", "right"]  # not measured before surgery: a 100-point error
    assert (right.truth_loss_pct, right.error_pp) == (0.0, 100.0)


def test_preoperative_twin_is_the_same_patient_before_surgery() -> None:
    """The twin that the held-out loss is measured against differs from the post-operative phantom only
    by the surgery: the other side is identical, and each atrophied muscle's true loss is its factor's."""
    from dataclasses import replace

    from seg.evaluate import atrophy_loss_records, preop_twin_options, side_volumes, unshrunk_loss_records
    from seg.phantom import PhantomOptions, make_phantom
    from seg.train import phantom_plan

    post = replace(next(o for o in phantom_plan(4, 80000) if o.postop), z_range_mm=(-60.0, 60.0))

    def truth(opts: PhantomOptions) -> dict:
        ph = make_phantom(opts)
        return side_volumes(ph.ct.with_array(np.asarray(ph.labels.array).astype(np.uint8)))

    tq, tp = truth(post), truth(preop_twin_options(post))
    twin = preop_twin_options(post)
    assert twin == replace(post, postop=False, atrophy={}, implant_side=None, fat_infiltration=0.0)
    assert twin.seed == post.seed and not twin.postop and post.atrophy  # the plan's own options untouched
    other = "left" if post.implant_side == "right" else "right"
    assert all(tp[k] == tq[k] for k in tp if k[1] == other)
    recs = atrophy_loss_records(post, (tp, tp), (tq, tq))
    assert len(recs) >= 3
    for r in recs:
        assert r.error_pp == 0.0
        assert r.truth_loss_pct == pytest.approx(100 * (1 - post.atrophy[r.muscle]), abs=3.0), r.muscle
    others = unshrunk_loss_records(post, (tp, tp), (tq, tq))
    assert {(r.muscle, r.side) for r in others}.isdisjoint((r.muscle, r.side) for r in recs)
    assert sum(r.side == other for r in others) >= 15 and all(r.error_pp == 0.0 for r in others)
    assert all(r.truth_loss_pct == 0.0 for r in others if r.side == other)


def test_evaluation_table_reads_at_80_columns_with_the_atrophy_summary() -> None:
    """`dicomnode evaluate`'s table (here the shipped package's own evaluation): display names, every line
    within 80 columns, and the atrophied muscles' loss error as median, max and how many meet the target."""
    from seg.package import DEMO_DIR

    res = Evaluation.load(DEMO_DIR / "evaluation.json")
    text = format_table(res)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "\nTensor fasciae latae " in text and "tensor_fasciae_latae" not in text
    errors = sorted(abs(a.error_pp) for a in res.atrophy_loss)
    within = sum(e <= res.targets.atrophy_loss_error_pp for e in errors)
    assert f"error median {np.median(errors):.1f}, max {max(errors):.1f} points" in text
    assert f"within {res.targets.atrophy_loss_error_pp:g} points: {within} of {len(errors)}" in text
    others = sorted(abs(a.error_pp) for a in res.unshrunk_loss)
    assert len(others) > 3 * len(errors)  # the same pairs' other muscles, both sides
    assert (f"muscles not shrunk, pre->post loss: {len(others)}, error median {np.median(others):.1f}, "
            f"max {max(others):.1f} points") in text


def test_evaluate_without_out_ends_with_a_readable_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --out the last line says the figure in words and how to keep the rest: it was a raw
    JSON line, {"mean_dice_muscles": ...}."""
    from typer.testing import CliRunner

    from dicomnode.cli import app

    pred, truth = _pair()
    res = aggregate([evaluate_case(pred, truth), evaluate_case(truth, truth)],
                    ModelInfo(name="m", version="1", demo=True))
    monkeypatch.setattr("seg.model.load_model", lambda *_, **__: object())
    monkeypatch.setattr("seg.evaluate.evaluate_model", lambda *_, **__: res)
    r = CliRunner().invoke(app, ["evaluate", "--phantoms", "2"])
    assert r.exit_code == 0, r.output
    last = r.output.strip().splitlines()[-1]
    assert last == "mean muscle Dice 0.7000 (2 cases); --out DIR saves evaluation.json and .csv"
    assert "{" not in r.output
