"""Learning curves of training recipes: validation Dice against training minutes, as a table and a plot.

Each run is a ``dicomnode train`` checkpoint folder (its ``history.jsonl``, or the JSON lines that
``train`` prints, saved as a log) and, optionally, the held-out evaluation written next to it by
``dicomnode evaluate --out RUN/heldout``. Runs of one comparison must have had the same wall time and
threads on the same machine, side by side, so that minutes compare.

    .venv/bin/python benchmarks/learning_curve.py RUN_A=label RUN_B=label \\
        --minutes 5,10,15,20 --plot docs/img/learning_curves.png
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from seg.records import Evaluation


@dataclass
class Run:
    """One training run's curve: (minutes, steps, validation mean muscle Dice) points."""

    label: str
    path: Path
    points: list[tuple[float, int, float]] = field(default_factory=list)
    heldout: float | None = None


def _history_lines(path: Path) -> list[dict]:
    """History entries from ``history.jsonl`` in a run folder, or from a log file of JSON lines."""
    src = path / "history.jsonl" if path.is_dir() else path
    if path.is_dir() and not src.exists():
        logs = sorted(path.parent.glob(f"{path.name}*.log"))
        if not logs:
            raise FileNotFoundError(f"{path}: no history.jsonl and no {path.name}*.log beside it")
        src = logs[0]
    out = []
    for line in src.read_text().splitlines():
        line = line.strip()
        if line.startswith("{") and "val_mean_dice_muscles" in line:
            out.append(json.loads(line))
    return out


def load_run(spec: str) -> Run:
    """``PATH`` or ``PATH=label``."""
    path, _, label = spec.partition("=")
    p = Path(path)
    run = Run(label=label or p.name, path=p)
    for e in _history_lines(p):
        run.points.append((e["elapsed_s"] / 60.0, int(e["step"]), float(e["val_mean_dice_muscles"])))
    ev = (p if p.is_dir() else p.parent) / "heldout" / "evaluation.json"
    if ev.exists():
        run.heldout = Evaluation.load(ev).mean_dice_muscles
    return run


def value_at(run: Run, minute: float) -> tuple[int, float] | None:
    """(steps, Dice) of the last validation at or before ``minute`` (the final validation of a run
    stopped by a time limit lands a few seconds past it); None when the run had none."""
    before = [p for p in run.points if p[0] <= minute + 0.25]
    return (before[-1][1], before[-1][2]) if before else None


def value_at_step(run: Run, step: int) -> float | None:
    """Dice of the validation at ``step`` exactly; None when the run did not validate there."""
    return next((p[2] for p in run.points if p[1] == step), None)


def table(runs: list[Run], minutes: list[float]) -> str:
    """Markdown table: one row per run, validation Dice (steps) at each minute mark, then held-out."""
    head = "| recipe | " + " | ".join(f"{m:g} min" for m in minutes) + " | held-out |"
    rule = "|---|" + "---:|" * (len(minutes) + 1)
    rows = [head, rule]
    for r in runs:
        cells = []
        for m in minutes:
            v = value_at(r, m)
            cells.append("-" if v is None else f"{v[1]:.3f} ({v[0]})")
        held = "-" if r.heldout is None else f"{r.heldout:.3f}"
        rows.append(f"| {r.label} | " + " | ".join(cells) + f" | {held} |")
    return "\n".join(rows)


def step_table(runs: list[Run], steps: list[int]) -> str:
    """Markdown table of validation Dice at equal optimiser steps (fair when runs differ in speed)."""
    rows = ["| recipe | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for r in runs:
        cells = [("-" if (v := value_at_step(r, s)) is None else f"{v:.3f}") for s in steps]
        rows.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(runs: list[Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for r in runs:
        if r.points:
            ax.plot([p[0] for p in r.points], [p[2] for p in r.points], marker=".", label=r.label)
    ax.set_xlabel("training minutes (wall clock)")
    ax.set_ylabel("validation mean Dice, 21 muscles")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folder (or log of JSON lines), optionally =label")
    ap.add_argument("--minutes", default="5,10,15,20", help="minute marks for the table")
    ap.add_argument("--steps", default="", help="step marks for a second table, e.g. 100,200,300")
    ap.add_argument("--plot", type=Path, help="write the curves as a PNG here")
    a = ap.parse_args()
    runs = [load_run(s) for s in a.runs]
    print(table(runs, [float(v) for v in a.minutes.split(",")]))
    if a.steps:
        print()
        print(step_table(runs, [int(v) for v in a.steps.split(",")]))
    if a.plot:
        plot(runs, a.plot)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
