"""``dicomnode demo`` as ``make demo`` runs it: ``.venv/bin/dicomnode demo`` in the working folder (the
default ``demo-output``, an 80-column terminal, the venv not on PATH), the node as its own process, the
shipped model, and Orthanc as the PACS (or, where Orthanc is not installed, the local store SCP the demo
falls back to).

The test of the main job's own command: it must finish, every line it prints (URLs aside) must fit 80
columns without being folded, every file and command it points to must work as printed, and the volumes
it shows must come from a model that segments, with the error against the phantom's truth stated. The
fast tests below hold the pieces that the one run cannot vary (an --out outside the working folder,
the console script on PATH or not).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from orthanc import requires_orthanc
from rich.console import Console

from dicomnode.commands import demo
from dicomnode.commands.common import model_lines
from dicomnode.harness.net import free_port
from seg.package import DEMO_STATEMENT
from seg.records import ChangeRecord, ModelInfo, StructureChange, StructureVolume, TotalChange, VolumeRecord

MODEL_LINE = re.compile(r"^model (\S+) (\S+):\n  " + re.escape(DEMO_STATEMENT) + "$", re.M)


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


def _as_make_demo(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """``make demo``'s command and environment in ``tmp_path``: ``.venv/bin/dicomnode`` by a relative
    path (``.venv`` a link to this interpreter's environment), whose ``bin`` is not on PATH."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "dicomnode").is_file():
        pytest.skip(f"no dicomnode console script in {bin_dir} (pip install -e . puts it there)")
    (tmp_path / ".venv").symlink_to(bin_dir.parent, target_is_directory=True)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and Path(p).resolve() != bin_dir.resolve()]
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb", "PATH": os.pathsep.join(path)}
    return [".venv/bin/dicomnode"], env


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.parametrize("pacs", [pytest.param("orthanc", marks=requires_orthanc), "local"])
def test_demo_runs_and_prints_80_columns(tmp_path: Path, pacs: str) -> None:
    command, env = _as_make_demo(tmp_path)
    run = subprocess.run([*command, "demo", "--no-view", "--pacs", pacs, "--timeout", "600"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=840)
    text = run.stdout
    assert run.returncode == 0, f"demo failed ({run.returncode}):\n{text[-3000:]}\n{run.stderr[-3000:]}"
    assert "demo finished" in text

    # 80 columns as a default terminal shows them: a line rich had to fold ends in a space, and a URL
    # (on a line of its own, unfolded) cannot be shortened
    lines = text.splitlines()
    too_wide = [ln for ln in lines if len(ln) > 80 and "http://" not in ln]
    assert not too_wide, "lines over 80 columns:\n" + "\n".join(too_wide)
    folded = [ln for ln in lines if ln != ln.rstrip()]
    assert not folded, "lines folded or with trailing spaces:\n" + "\n".join(map(repr, folded))

    # later commands as they run here: the console script by its path, each whole on one line
    config = "--config demo-output/node.toml"
    assert re.search(rf"^ +\.venv/bin/dicomnode serve {config}$", text, re.M), text
    assert re.search(rf"^  \.venv/bin/dicomnode jobs {config}$", text, re.M), text
    if pacs == "orthanc":
        # the same demo again (its options as given), now keeping the viewer open
        again = r"^    \.venv/bin/dicomnode demo --pacs orthanc --timeout 600 --view$"
        assert re.search(again, text, re.M), text
    assert not re.search(r"(?<![/\w])dicomnode (serve|jobs|demo) -", text), text
    assert re.search(r"^ +demo-output/registry\.csv$|imported .* demo-output/registry\.csv$", text, re.M)

    # the model by name and version, phantom-trained, in the console and not only on the image
    assert (m := MODEL_LINE.search(text)) and m.groups() == ("thigh-unetr-demo", "0.9.3"), text[:3000]
    # the interval is the CTs' (the pre-op CT is two days before surgery)
    assert "Change between the CTs: 120 days apart" in text and "after surgery:" not in text
    assert "surgery on 2024-01-07, 118 days before the follow-up CT" in text
    # the change's error against the truth, stated and not left to the reader
    ok = re.search(r"^left \(operated\): (\d+) of (\d+) muscles within 5 pp of the truth", text, re.M)
    assert ok and int(ok.group(2)) == 21 and int(ok.group(1)) <= 21, text
    assert re.search(r"^  worst: .+ [-+]?\d+\.\d % vs [-+]?\d+\.\d % true, \d+\.\d pp off$", text, re.M)
    assert re.search(r"^total, 21 analysed muscles, both sides: -\d+\.\d % measured, -\d+\.\d % true$",
                     text, re.M), text
    assert demo.implant_caveat("left") in lines
    # which muscles the caveat is about: the operated side's flagged ones, by name
    named = re.search(r"^next to it, the least reliable: (.+(?:\n  .+)*)", text, re.M)
    assert named and " left" in named.group(1) and " right" not in named.group(1), text

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


# ------------------------------------------------------------------------------------------------
# The pieces one run cannot vary (fast, no node)
# ------------------------------------------------------------------------------------------------
def _console(width: int = 80) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, force_terminal=False, color_system=None), buf


def test_a_long_path_is_printed_whole_on_its_own_line() -> None:
    """An --out outside the working folder: the command is not folded mid-path, the step fits 80."""
    console, buf = _console()
    command = "/very/long/" + "x" * 90 + "/.venv/bin/dicomnode serve --config /elsewhere/demo/node.toml"
    demo.print_step(console, 3.9, "starting the node as its own process:", command)
    demo.print_step(console, 4.0, "node up, its log:", "demo/node.log")
    lines = buf.getvalue().splitlines()
    assert lines == ["   3.9 s  starting the node as its own process:", " " * 10 + command,
                     "   4.0 s  node up, its log: demo/node.log"]


def test_the_cli_command_is_the_one_that_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``make demo`` does not put .venv/bin on PATH: a printed bare ``dicomnode`` would not be found."""
    script = tmp_path / ".venv" / "bin" / "dicomnode"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "argv", [".venv/bin/dicomnode", "demo"])
    assert demo.cli_command() == ".venv/bin/dicomnode"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # outside the working folder: the absolute path
    monkeypatch.setattr(sys, "argv", [str(script), "demo"])
    assert demo.cli_command() == str(script)
    monkeypatch.setenv("PATH", str(script.parent))  # found on PATH as itself: the bare name
    assert demo.cli_command() == "dicomnode"
    monkeypatch.setattr(sys, "argv", [str(Path(demo.__file__).parent.parent / "cli.py"), "demo"])
    assert demo.cli_command().endswith(" -m dicomnode.cli")


def test_the_model_line_names_the_model_and_says_demo() -> None:
    info = ModelInfo(name="thigh-unetr-demo", version="0.9.0", demo=True, statement=DEMO_STATEMENT)
    lines = model_lines(info)
    assert MODEL_LINE.search("\n".join(lines)) and all(len(ln) <= 80 for ln in lines), lines
    assert model_lines(info.model_copy(update={"statement": ""})) == lines  # an older package
    assert model_lines(ModelInfo(name="site", version="2.1")) == ["model site 2.1"]
    validated = ModelInfo(name="s", version="1", statement="validated")
    assert model_lines(validated) == ["model s 1: validated"]


def _volumes(left: dict[str, float], right: dict[str, float]) -> VolumeRecord:
    return VolumeRecord(structures=tuple(
        StructureVolume(label=i + 1, name=n, volume_cm3=left[n] + right[n], left_cm3=left[n],
                        right_cm3=right[n])
        for i, n in enumerate(left)))


def _change(pct: dict[tuple[str, str], float | None], total_pct: float) -> ChangeRecord:
    return ChangeRecord(
        structures=tuple(StructureChange(label=1, name=n, side=s, change_pct=v) for (n, s), v in pct.items()),
        total_analysed_muscles=TotalChange(structures=2, change_pct=total_pct), fractured_side="left",
        days_between=120, surgery_date="20240107", followup={"study_date": "20240504"})


def test_the_change_summary_states_the_error_against_the_truth() -> None:
    """Within 5 pp on the operated side, the worst muscle with both figures, the totals: not hidden."""
    pre = _volumes({"tensor_fasciae_latae": 50.0, "sartorius": 100.0},
                   {"tensor_fasciae_latae": 50.0, "sartorius": 100.0})
    post = _volumes({"tensor_fasciae_latae": 42.5, "sartorius": 100.0},
                    {"tensor_fasciae_latae": 50.0, "sartorius": 100.0})
    change = _change({("tensor_fasciae_latae", "left"): 26.9, ("sartorius", "left"): -3.0,
                      ("tensor_fasciae_latae", "right"): 0.0, ("sartorius", "right"): None}, total_pct=4.1)
    lines = demo.change_summary(change, pre, post)
    assert lines == [
        "left (operated): 1 of 2 muscles within 5 pp of the truth (the target)",
        "  worst: Tensor fasciae latae +26.9 % vs -15.0 % true, 41.9 pp off",
        "right (not operated): 1 of 1 muscles within 5 pp of the truth (the target)",
        "  worst: Tensor fasciae latae 0.0 % vs 0.0 % true, 0.0 pp off",
        "total, 2 analysed muscles, both sides: +4.1 % measured, -2.5 % true",
    ]
    assert all(len(ln) <= 80 for ln in [*lines, demo.implant_caveat("right")])


def test_the_caveat_names_the_muscles_next_to_the_implant() -> None:
    """The flagged sides by name, wrapped to 80 columns; nothing when none is flagged (no metal)."""
    names = ["vastus_intermedius", "quadratus_femoris", "vastus_lateralis", "adductor_brevis",
             "adductor_magnus"]
    flagged = VolumeRecord(structures=tuple(
        StructureVolume(label=i + 1, name=n, volume_cm3=2.0, left_cm3=1.0, right_cm3=1.0,
                        left_near_metal=True, right_near_metal=False) for i, n in enumerate(names)))
    lines = demo.near_metal_lines(flagged)
    assert lines[0].startswith("next to it, the least reliable: Vastus intermedius left, Quadratus")
    assert len(lines) == 2 and lines[1].startswith("  ") and all(len(ln) <= 80 for ln in lines)
    assert " right" not in " ".join(lines)
    assert demo.near_metal_lines(_volumes({"sartorius": 1.0}, {"sartorius": 1.0})) == []


def test_the_interval_is_between_the_cts_and_from_surgery() -> None:
    change = _change({}, total_pct=0.0)
    assert demo.interval_lines(change) == ["Change between the CTs: 120 days apart, fractured side left",
                                           "surgery on 2024-01-07, 118 days before the follow-up CT"]
    assert demo.interval_lines(change.model_copy(update={"surgery_date": None})) == [
        "Change between the CTs: 120 days apart, fractured side left"]


def test_the_view_command_runs_the_same_demo_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """After `demo --out 'run 2' --seed 3`, the printed way to keep the viewer open repeats those
    options (a bare `demo --view` replaced demo-output with another patient's demo)."""
    from typer.testing import CliRunner

    from dicomnode.cli import app

    seen: dict = {}
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: seen.update(k) or 0)
    port = free_port()  # a chosen port is repeated as typed (--node-port, not --node_port)
    given = ["--out", "run 2", "--seed", "3", "--timeout", "600", "--node-port", str(port), "--no-view"]
    for args, again in ((given, f"demo --out 'run 2' --seed 3 --timeout 600 --node-port {port} --view"),
                        ([], "demo --view")):
        assert CliRunner().invoke(app, ["demo", *args]).exit_code == 0
        assert demo.again_with_view("dicomnode", list(seen["options"])) == f"dicomnode {again}"


def test_the_demo_names_the_job_that_ended_without_results() -> None:
    """It looked for a "job_id" key `jobs --json` does not have (so it said "job ?") and matched the
    series anywhere in the row's text."""
    rows = [{"id": 3, "series_instance_uid": "1.2.3.45", "state": "done", "reason": None},
            {"id": 4, "series_instance_uid": "1.2.3.4", "state": "rejected", "reason": "z-coverage"}]
    assert demo._job_problem(rows, "1.2.3.4") == "job 4 rejected: z-coverage"
    assert demo._job_problem(rows, "1.2.3.45") is None
