"""The campaign curve is rebuilt from the demo packages in git history and from a run's history.jsonl."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.campaign_curve import Leg, legs_from_packages, plot, run_leg, shipped_legs

ROOT = Path(__file__).resolve().parents[1]


def _full_history() -> bool:
    cmd = ["git", "rev-parse", "--is-shallow-repository"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == "false"


@pytest.mark.skipif(not _full_history(), reason="needs the repository's full git history")
def test_every_leg_of_the_shipped_campaign_has_a_package_with_its_curve(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    legs = shipped_legs()
    campaign = json.loads((ROOT / "seg/models/demo/model.json").read_text())["provenance"]["campaign"]
    assert len(legs) == len(campaign["legs"])
    for leg in legs:
        assert leg.points, leg.label
        assert all(0 < step <= leg.steps and 0.0 <= dice <= 1.0 for step, dice in leg.points), leg.label


def test_a_run_folder_becomes_the_next_leg(tmp_path: Path) -> None:
    lines = [{"step": 100, "loss": 0.4, "val_mean_dice_muscles": 0.91},
             {"step": 150, "loss": 0.39},
             {"step": 200, "loss": 0.38, "val_mean_dice_muscles": 0.92}]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    leg = run_leg(tmp_path, "leg 6")
    assert (leg.steps, leg.points) == (200, [(100, 0.91), (200, 0.92)])
    assert run_leg(tmp_path / "history.jsonl", "leg 6") == leg  # the file itself, as docs/campaign keeps it
    plot([leg], tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_leg_is_drawn_however_many_there_are(tmp_path: Path) -> None:
    """Eleven legs (more than the eight marker shapes): eleven curves, each after the one before."""
    legs = [Leg(f"leg {i}", 100, [(50, 0.9), (100, 0.91)]) for i in range(1, 12)]
    fig = plot(legs, tmp_path / "curve.png")
    curves = [line for line in fig.axes[0].lines if line.get_label().startswith("leg ")]
    assert len(curves) == 11
    assert [float(c.get_xdata()[0]) for c in curves] == [50.0 + 100 * i for i in range(11)]


def _package(version: str, legs: list[dict], history: list[dict], batch: int = 4) -> dict:
    return {"version": version, "provenance": {
        "campaign": {"legs": legs}, "history": history,
        "config": {"phantoms": 384, "postop_share": 0.5, "batch_size": batch},
        "trained_on": {"val_seeds": [1384, 1385]}}}


def test_a_package_that_ships_several_legs_keeps_each_curve() -> None:
    """Two GPU legs shipped as one package: the first has no package of its own, so its curve
    comes from its campaign record; a version that changed only inference keeps its leg."""
    h = [{"step": 0, "val_mean_dice_muscles": 0.90}, {"step": 50, "val_mean_dice_muscles": 0.91}]
    one = {"steps": 100, "wall_s": 60.0}
    gpu_a = {"steps": 200, "wall_s": 30.0, "name": "leg 12 (H200)",
             "history": [{"step": 100, "val_mean_dice_muscles": 0.93}]}
    gpu_b = {"steps": 150, "wall_s": 20.0, "name": "leg 13 (H200)"}
    packages = [{"version": "0.1.0", "provenance": {}},  # before the campaign record: left out
                _package("0.2.0", [one], h), _package("0.2.1", [one], h),
                _package("0.9.0", [one, gpu_a, gpu_b], [{"step": 150, "val_mean_dice_muscles": 0.94}], 16)]
    legs = legs_from_packages(packages)
    assert [leg.steps for leg in legs] == [100, 200, 150]
    assert legs[0].label == "leg 1: 384 phantoms, 50% post-op, val 1384+1385 (→ 0.2.0, 0.2.1)"
    assert legs[0].points == [(50, 0.91)]  # the starting weights' step-0 check is not a point
    assert legs[1].label == "leg 12 (H200) (not shipped alone)" and legs[1].points == [(100, 0.93)]
    assert legs[2].label == "leg 13 (H200): 384 phantoms, 50% post-op, val 1384+1385, batch 16 (→ 0.9.0)"
    assert legs[2].points == [(150, 0.94)]

