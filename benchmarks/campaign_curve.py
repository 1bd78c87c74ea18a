"""The demo model's training campaign as one validation curve, from the packages in git history.

Each shipped demo package records its leg's validation history (``provenance.history``) and the
newest one lists every leg's steps (``provenance.campaign``; a leg shipped only inside a later
package keeps its history in that record), so the curve needs no checkpoint folder: it is rebuilt
from the committed ``seg/models/demo/model.json`` versions. A leg still in
training (or not shipped) is added from its checkpoint folder's ``history.jsonl`` with ``--run``.

    .venv/bin/python benchmarks/campaign_curve.py --out docs/img/campaign_curve.png \\
        [--run checkpoints/next="leg 6: ..."] [--run docs/campaign/leg15.jsonl="leg 15: ..."]
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
    """(step, Dice) of a leg's validations; a step-0 entry (the starting weights) is left out."""
    return [(int(h["step"]), float(h["val_mean_dice_muscles"]))
            for h in history if h.get("val_mean_dice_muscles") is not None and int(h["step"]) > 0]


def _label(n: int, prov: dict, version: str | None, name: str | None = None) -> str:
    cfg, data = prov.get("config", {}), prov.get("trained_on", {})
    share = cfg.get("postop_share", 0.25)
    post = "" if share == 0.25 else f", {share:.0%} post-op"
    seeds = "+".join(str(s) for s in data.get("val_seeds", []))
    batch = "" if cfg.get("batch_size", 4) == 4 else f", batch {cfg['batch_size']}"
    ship = f" (→ {version})" if version else ""
    return f"{name or f'leg {n}'}: {cfg.get('phantoms')} phantoms{post}, val {seeds}{batch}{ship}"


def shipped_legs() -> list[Leg]:
    """Every leg of the shipped package's campaign, from the demo packages in git history."""
    revs = _git("log", "--reverse", "--format=%H", "--", PACKAGE).split()
    return legs_from_packages([json.loads(_git("show", f"{rev}:{PACKAGE}")) for rev in revs])


def legs_from_packages(packages: list[dict]) -> list[Leg]:
    """The newest package's campaign legs, oldest first, each with its validation curve.

    A leg's curve is the ``provenance.history`` of the package that shipped it (the package whose
    campaign record ends with that leg; of several, as 0.8.0 and 0.8.1, the newest); a leg that was
    never shipped on its own (an intermediate leg of a package) carries its curve in its record
    (``history``). Packages from before the campaign's record are left out.
    """
    packages = [m for m in packages if "campaign" in m.get("provenance", {})]
    if not packages:
        return []
    shipped: dict[int, tuple[dict, list[str]]] = {}
    for m in packages:
        n = len(m["provenance"]["campaign"]["legs"])
        versions = shipped[n][1] if n in shipped else []
        shipped[n] = (m, [*versions, m.get("version", "")])
    legs = []
    for n, rec in enumerate(packages[-1]["provenance"]["campaign"]["legs"], start=1):
        if n in shipped:
            m, versions = shipped[n]
            legs.append(Leg(_label(n, m["provenance"], ", ".join(versions), rec.get("name")),
                            int(rec["steps"]), _points(m["provenance"]["history"])))
        else:
            legs.append(Leg(f"{rec.get('name') or f'leg {n}'} (not shipped alone)", int(rec["steps"]),
                            _points(rec.get("history", []))))
    return legs


def run_leg(path: Path, label: str) -> Leg:
    """A leg from a checkpoint folder's ``history.jsonl``, or such a file itself (a run not shipped,
    or still training; ``docs/campaign/`` keeps those of the legs not shipped, whose folders do not
    outlive the training machine)."""
    history = path if path.is_file() else path / "history.jsonl"
    lines = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    points = _points(lines)
    return Leg(label, max((int(h["step"]) for h in lines), default=0), points)


def plot(legs: list[Leg], out: Path):
    """Every leg's curve, one after the other on the step axis; returns the figure."""
    import itertools

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 4.0), dpi=100)
    offset = 0
    for leg, marker in zip(legs, itertools.cycle("osd^vP*X"), strict=False):
        if leg.points:
            xs, ys = zip(*((offset + s, d) for s, d in leg.points), strict=True)
            ax.plot(xs, ys, marker=marker, ms=3, lw=1.5, label=leg.label)
        offset += leg.steps
    ax.axhline(TARGET, ls="--", lw=1, color="grey", label=f"target {TARGET} (held-out)")
    ax.set(xlabel="optimiser steps (48³ crops, batch 4 unless the leg says otherwise)",
           ylabel="validation mean muscle Dice", ylim=(0, 1),
           title="Demo model campaign (2 CPU cores, unless a leg names a GPU)")
    ax.grid(alpha=0.3)
    # below the axes: with twenty-odd legs a legend inside covers the curves and the title
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return fig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/img/campaign_curve.png"), help="PNG to write")
    ap.add_argument("--run", action="append", default=[], metavar="DIR=LABEL",
                    help="add a checkpoint folder's history.jsonl (or such a file) as the next leg "
                    "(repeatable)")
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
