"""The campaign curve is rebuilt from the demo packages in git history and from a run's history.jsonl."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.campaign_curve import Leg, plot, run_leg, shipped_legs

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
    plot([leg], tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_leg_is_drawn_however_many_there_are(tmp_path: Path) -> None:
    """Eleven legs (more than the eight marker shapes): eleven curves, each after the one before."""
    legs = [Leg(f"leg {i}", 100, [(50, 0.9), (100, 0.91)]) for i in range(1, 12)]
    fig = plot(legs, tmp_path / "curve.png")
    curves = [line for line in fig.axes[0].lines if line.get_label().startswith("leg ")]
    assert len(curves) == 11
    assert [float(c.get_xdata()[0]) for c in curves] == [50.0 + 100 * i for i in range(11)]
