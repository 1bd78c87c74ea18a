"""The demo model's training campaign as one validation curve, from the packages in git history.

Each shipped demo package records its leg's validation history (``provenance.history``) and the
newest one lists every leg's steps (``provenance.campaign``), so the curve needs no checkpoint
folder: it is rebuilt from the committed ``seg/models/demo/model.json`` versions. A leg still in
training (or not shipped) is added from its checkpoint folder's ``history.jsonl`` with ``--run``.

    .venv/bin/python benchmarks/campaign_curve.py --out docs/img/campaign_curve.png \\
        [--run checkpoints/next="leg 6: ..."]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "seg/models/demo/model.json"
TARGET = 0.93


@dataclass
class Leg:
    """One leg of the campaign: its label, steps in all, and (step within the leg, Dice) points."""

    label: str
    steps: int
    points: list[tuple[int, float]]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def _points(history: list[dict]) -> list[tuple[int, float]]:
    return [(int(h["step"]), float(h["val_mean_dice_muscles"]))
            for h in history if h.get("val_mean_dice_muscles") is not None]


def _label(n: int, prov: dict, version: str | None) -> str:
    cfg, data = prov.get("config", {}), prov.get("trained_on", {})
    share = cfg.get("postop_share", 0.25)
    post = "" if share == 0.25 else f", {share:.0%} post-op"
    seeds = "+".join(str(s) for s in data.get("val_seeds", []))
    ship = f" (→ {version})" if version else ""
    return f"leg {n}: {cfg.get('phantoms')} phantoms{post}, val {seeds}{ship}"


def shipped_legs() -> list[Leg]:
    """Every campaign leg shipped as a demo package, oldest first (packages without a campaign
    record, from before the campaign's recipe, are left out)."""
    revs = _git("log", "--reverse", "--format=%H", "--", PACKAGE).split()
    packages = [json.loads(_git("show", f"{rev}:{PACKAGE}")) for rev in revs]
    packages = [m for m in packages if "campaign" in m.get("provenance", {})]
    if not packages:
        return []
    # A version that only changed what inference asks for (0.8.1: the refinement's claim gate) keeps
    # its leg's campaign record: one leg, several versions.
    legs: list[tuple[dict, list[str]]] = []
    for m in packages:
        n = len(m["provenance"]["campaign"]["legs"])
        if legs and n == len(legs[-1][0]["provenance"]["campaign"]["legs"]):
            legs[-1] = (m, [*legs[-1][1], m.get("version", "")])
        else:
            legs.append((m, [m.get("version", "")]))
    legs_steps = [int(leg["steps"]) for leg in packages[-1]["provenance"]["campaign"]["legs"]]
    if len(legs_steps) != len(legs):
        raise SystemExit(f"{len(legs)} legs shipped as packages but {len(legs_steps)} in the campaign record")
    return [Leg(_label(i + 1, m["provenance"], ", ".join(versions)), steps,
                _points(m["provenance"]["history"]))
            for i, ((m, versions), steps) in enumerate(zip(legs, legs_steps, strict=True))]


def run_leg(path: Path, label: str) -> Leg:
    """A leg from a checkpoint folder's ``history.jsonl`` (a run not shipped, or still training)."""
    lines = [json.loads(line) for line in (path / "history.jsonl").read_text().splitlines() if line.strip()]
    points = _points(lines)
    return Leg(label, max((int(h["step"]) for h in lines), default=0), points)


def plot(legs: list[Leg], out: Path):
    """Every leg's curve, one after the other on the step axis; returns the figure."""
    import itertools

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 3.8), dpi=100)
    offset = 0
    for leg, marker in zip(legs, itertools.cycle("osd^vP*X"), strict=False):
        if leg.points:
            xs, ys = zip(*((offset + s, d) for s, d in leg.points), strict=True)
            ax.plot(xs, ys, marker=marker, ms=3, lw=1.5, label=leg.label)
        offset += leg.steps
    ax.axhline(TARGET, ls="--", lw=1, color="grey", label=f"target {TARGET} (held-out)")
    ax.set(xlabel="optimiser steps (batch 4, 48³ crops)", ylabel="validation mean muscle Dice",
           ylim=(0, 1), title="Demo model campaign (2 CPU cores)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return fig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/img/campaign_curve.png"), help="PNG to write")
    ap.add_argument("--run", action="append", default=[], metavar="DIR=LABEL",
                    help="add a checkpoint folder's history.jsonl as the next leg (repeatable)")
    args = ap.parse_args(argv)
    legs = shipped_legs()
    for spec in args.run:
        path, _, label = spec.partition("=")
        legs.append(run_leg(Path(path), label or f"leg {len(legs) + 1}: {path}"))
    for leg in legs:
        last = f"{leg.points[-1][1]:.3f}" if leg.points else "-"
        best = f"{max(d for _, d in leg.points):.3f}" if leg.points else "-"
        print(f"{leg.label:60.60s} {leg.steps:6d} steps  best {best}  last {last}")
    plot(legs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
