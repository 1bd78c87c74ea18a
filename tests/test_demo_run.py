"""``dicomnode demo`` as ``make demo`` runs it: the node as its own process, the shipped model, and
Orthanc as the PACS (or, where Orthanc is not installed, the local store SCP the demo falls back to).

The test of the main job's own command: it must finish, every line it prints (URLs and rules aside)
must fit 80 columns without being folded, every file it points to must exist, and the volumes it
shows must come from a model that segments.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from orthanc import requires_orthanc

pytestmark = pytest.mark.e2e


def _listed_files(text: str) -> dict[str, list[tuple[str, Path]]]:
    """Each study's ``(kind, path)`` from the "Where the outputs are" section."""
    section = text.split("Where the outputs are", 1)[1]
    out: dict[str, list[tuple[str, Path]]] = {}
    study, folder = "", Path()
    for line in section.splitlines():
        if m := re.match(r"(pre-op|follow-up) study ", line):
            study = m.group(1)
            out[study] = []
        elif m := re.match(r"  from the PACS, in (\S+)$", line):
            folder = Path(m.group(1))
        elif m := re.match(r"    (SEG|SR|summary|other)\s+(\S+\.dcm)$", line):
            out[study].append((m.group(1), folder / m.group(2)))
        elif m := re.match(r"    (\S+/results/\S+)$", line):
            out[study].append(("node", Path(m.group(1))))
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("pacs", [pytest.param("orthanc", marks=requires_orthanc), "local"])
def test_demo_runs_and_prints_80_columns(tmp_path: Path, pacs: str) -> None:
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}  # wide: a line over 80 is ours, not folded
    run = subprocess.run([sys.executable, "-m", "dicomnode.cli", "demo", "--no-view", "--out", "demo",
                          "--pacs", pacs, "--timeout", "600"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=840)
    text = run.stdout
    assert run.returncode == 0, f"demo failed ({run.returncode}):\n{text[-3000:]}\n{run.stderr[-3000:]}"
    assert "demo finished" in text

    # a rule spans the terminal, and a URL cannot be shortened
    too_wide = [ln for ln in text.splitlines()
                if len(ln) > 80 and "http://" not in ln and not ln.startswith("─")]
    assert not too_wide, "lines over 80 columns:\n" + "\n".join(too_wide)

    dice = [float(x) for x in re.findall(r"mean Dice over the 21 muscles, both sides: ([0-9.]+)", text)]
    assert len(dice) == 2 and min(dice) >= 0.90, dice
    assert len(re.findall(r"^Tensor fasciae latae ", text, re.M)) == 3  # two volume tables, the change

    listed = _listed_files(text)
    assert sorted(listed) == ["follow-up", "pre-op"]
    for study, want in (("pre-op", ["SEG", "SR", "node", "summary"]),
                        ("follow-up", ["SEG", "SR", "SR", "node", "summary"])):
        assert sorted(kind for kind, _ in listed[study]) == sorted(want), listed[study]
        for kind, path in listed[study]:
            full = tmp_path / path
            assert (full / "volumes.json").is_file() if kind == "node" else full.is_file(), full
