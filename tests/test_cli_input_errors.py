"""A file or folder named on the command line that cannot be used ends the command with a usage error
that names the option and says why (exit 2), never a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dicomnode.cli import app


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from seg.phantom import PhantomOptions, make_phantom, write_phantom

    out = tmp_path_factory.mktemp("ph")
    write_phantom(make_phantom(PhantomOptions(seed=5, spacing_mm=(4.0, 4.0, 4.0), z_range_mm=(-20, 20))), out)
    return out


def _off_grid_dataset(phantom: Path, root: Path) -> Path:
    """A good case, then one whose label map lies on a grid of twice the slice spacing (found before
    the good one is segmented: no work is thrown away)."""
    from seg.io import load_nifti, save_nifti
    from seg.volume import Volume

    (root / "case1").mkdir(parents=True)
    (root / "case1" / "dicom").symlink_to(phantom / "dicom")
    (root / "case1" / "labels.nii.gz").symlink_to(phantom / "truth" / "labels.nii.gz")
    lab = load_nifti(phantom / "truth" / "labels.nii.gz")
    (root / "case7").mkdir(parents=True)
    (root / "case7" / "dicom").symlink_to(phantom / "dicom")
    coarser = Volume(lab.array, lab.affine @ np.diag([1.0, 1.0, 2.0, 1.0]))
    save_nifti(coarser, root / "case7" / "labels.nii.gz")
    return root


@pytest.mark.parametrize("case", ["evaluate-empty", "evaluate-off-grid", "train-missing", "segment-not-ct",
                                  "volumes-no-labels", "volumes-no-ct", "demo-no-model", "train-both",
                                  "evaluate-z-range", "train-z-range", "phantom-z-range",
                                  "phantom-atrophy", "phantom-fov", "segment-record-nifti"])
def test_bad_input_is_a_usage_error_naming_the_option(case: str, phantom: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    t = tmp_path

    def segment(*_: object, **__: object) -> None:  # evaluate checks every case before segmenting any
        raise AssertionError("a case was segmented before the dataset was checked")

    monkeypatch.setattr("seg.infer.segment", segment)
    (t / "empty").mkdir()
    (t / "note.dcm").write_text("not a DICOM file")
    args, option, why = {
        "evaluate-empty": (["evaluate", "--data", str(t / "empty")], "--data", "no cases under"),
        "evaluate-off-grid": (["evaluate", "--data", str(_off_grid_dataset(phantom, t / "ds"))],
                              "--data", "case case7: the label map is not on the CT's grid"),
        "train-missing": (["train", "--data", str(t / "nowhere"), "--out", str(t / "pkg"),
                           "--checkpoints", str(t / "ck"), "--no-progress"], "--data", "does not exist"),
        "segment-not-ct": (["segment", str(t / "note.dcm"), "--out", str(t / "seg"), "--no-progress"],
                           "INPUT", "no DICOM images"),
        "volumes-no-labels": (["volumes", "--ct", str(phantom / "dicom"), "--labels", str(t / "x.nii.gz"),
                               "--out", str(t / "v")], "--labels", "x.nii.gz"),
        "volumes-no-ct": (["volumes", "--ct", str(t / "nowhere"), "--labels",
                           str(phantom / "truth" / "labels.nii.gz"), "--out", str(t / "v")],
                          "--ct", "does not exist"),
        "demo-no-model": (["demo", "--model", str(t / "nowhere"), "--out", str(t / "demo"), "--no-view"],
                          "--model", "is not a folder"),
        # --phantoms was ignored beside --data (evaluate refused it, train did not)
        "train-both": (["train", "--data", str(t / "empty"), "--phantoms", "2", "--out", str(t / "pkg")],
                       "--phantoms", "not both"),
        # a traceback in train and evaluate; "30,-60" made an empty phantom
        "evaluate-z-range": (["evaluate", "--phantoms", "1", "--z-range", "1,2,3"], "--z-range", "lo < hi"),
        "train-z-range": (["train", "--phantoms", "1", "--z-range", "a,b", "--out", str(t / "pkg")],
                          "--z-range", "'a,b'"),
        "phantom-z-range": (["phantom", "--out", str(t / "pkg"), "--z-range", "30,-60"], "--z-range",
                            "lo < hi"),
        "phantom-atrophy": (["phantom", "--out", str(t / "pkg"), "--atrophy", "sartorius=x"], "--atrophy",
                            "NAME=FACTOR"),
        "phantom-fov": (["phantom", "--out", str(t / "pkg"), "--fov", "400xwide"], "--fov", "400xwide"),
        "segment-record-nifti": (["segment", str(phantom / "truth" / "labels.nii.gz"), "--record",
                                  "--no-progress"], "INPUT", "--record need a DICOM series"),
    }[case]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert f"Invalid value for {option}" in res.output and why in res.output, res.output
    assert "Traceback" not in res.output and not (t / "pkg").exists() and not (t / "demo").exists()


@pytest.mark.parametrize("command", [["jobs"], ["status"], ["retry", "1"], ["patients", "list"],
                                     ["patients", "timeline", "P1"], ["report", "patient", "P1"],
                                     ["report", "cohort", "--out", "report"]])
def test_commands_that_read_the_index_refuse_a_folder_without_one(command: list[str], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A forgotten --config: the default storage folder (./var) has no index. Saying so beats an empty
    new index that shows "no jobs" for a node that has hundreds."""
    monkeypatch.chdir(tmp_path)
    for name in ("DICOMNODE_CONFIG", "DICOMNODE_STORAGE_DIR"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2, result.output
    assert f"no node index at {tmp_path / 'var' / 'index.sqlite'}" in " ".join(result.output.split())
    assert not (tmp_path / "var").exists()


_AS_ANOTHER_USER = """
import os
from typer.testing import CliRunner
from dicomnode.cli import app
import dicomnode.db, dicomnode.processing.jobs, dicomnode.storage.diskspace  # noqa: F401 (imported
# before the user changes: the interpreter may lie where that user cannot read)
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
result = CliRunner().invoke(app, ["status"])
print(result.exit_code)
print(result.output)
print(repr(result.exception))
"""


def test_commands_that_read_the_index_say_when_this_user_may_not(tmp_path: Path) -> None:
    """An administrator's own account on the node's storage (folders 0750, index 0600, the service
    user's): one line saying to run as that user, not a PermissionError traceback. Run in a child
    that leaves root (user nobody) when the tests run as root, whom no mode stops."""
    import os
    import subprocess
    import sys

    locked = tmp_path / "locked"
    (locked / "var").mkdir(parents=True)
    (locked / "var" / "index.sqlite").write_bytes(b"")
    locked.chmod(0o700 if os.geteuid() == 0 else 0o000)
    env = {**os.environ, "DICOMNODE_STORAGE_DIR": str(locked / "var"), "COLUMNS": "400"}
    env.pop("DICOMNODE_CONFIG", None)
    try:
        run = subprocess.run([sys.executable, "-c", _AS_ANOTHER_USER], env=env, cwd="/",
                             capture_output=True, text=True, timeout=120)
    finally:
        locked.chmod(0o700)
    out = " ".join(run.stdout.split())
    assert run.returncode == 0, run.stderr
    assert out.startswith("2 "), out
    assert f"cannot read the node index at {locked / 'var' / 'index.sqlite'}: permission denied" in out
    assert "sudo -u dicomnode" in out and "Traceback" not in out


def test_a_config_file_this_user_may_not_read_is_said_so(tmp_path: Path) -> None:
    """node.toml is root:dicomnode 0640 (it may hold ops.token): another account gets one line, not a
    PermissionError traceback. As root, the child leaves root (user nobody) to be refused."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "node.toml"
    cfg.write_text('port = 11112\n')
    cfg.chmod(0o000)
    script = _AS_ANOTHER_USER.replace('["status"]', f'["config", "show", "--config", {str(cfg)!r}]')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    try:
        run = subprocess.run([sys.executable, "-c", script], env={**env, "COLUMNS": "400"}, cwd="/",
                             capture_output=True, text=True, timeout=120)
    finally:
        cfg.chmod(0o600)
    out = " ".join(run.stdout.split())
    assert run.returncode == 0, run.stderr
    assert out.startswith("2 ") and f"cannot read {cfg}: permission denied" in out, out
    assert "Traceback" not in out


@pytest.mark.parametrize("case", ["out-is-init", "resume-nothing", "new-run-over-old", "resume-other-net",
                                  "heads", "init-not-a-package", "init-other-net"])
def test_train_refuses_what_would_lose_work_or_fail_late(case: str, tmp_path: Path) -> None:
    """Refused before any phantom is rendered or case cached: exporting over the package the run
    starts from (the node may load it), --resume with nothing to resume (it started afresh) or with
    another network, a new run over an earlier run's checkpoints, a package that does not fit."""
    import json

    from seg.package import DEMO_DIR

    ck = tmp_path / "ck"
    args = ["train", "--out", str(tmp_path / "pkg"), "--phantoms", "2", "--checkpoints", str(ck)]
    if case in ("new-run-over-old", "resume-other-net"):
        ck.mkdir()
        (ck / "last.pt").write_bytes(b"")
        (ck / "config.json").write_text(json.dumps({"arch": {"hidden_size": 96}, "spacing_mm": [4.0] * 3,
                                                    "targets": "partial_volume"}))
    extra, hint, said = {
        "out-is-init": (["--init-from", str(tmp_path / "pkg")], "--out", "is the package --init-from"),
        "resume-nothing": (["--resume"], "--resume", "no checkpoint to resume"),
        "new-run-over-old": ([], "--checkpoints", "holds a run already"),
        "resume-other-net": (["--resume"], "--resume", "was started with other arch"),
        "heads": (["--hidden-size", "100", "--num-heads", "3"], "--num-heads", "not divisible"),
        "init-not-a-package": (["--init-from", str(tmp_path)], "--init-from", "has no model.json"),
        "init-other-net": (["--init-from", str(DEMO_DIR), "--hidden-size", "96"], "--init-from",
                           "hidden_size 192 in the package, 96 here"),
    }[case]
    result = CliRunner().invoke(app, [*args, *extra])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and hint in text and said in text, result.output
    assert not (ck / "cache").exists()  # nothing done


@pytest.mark.parametrize("case", ["segment", "segment-batch", "segment-batch-empty", "evaluate-both",
                                  "evaluate-missing"])
def test_input_is_checked_before_the_model_loads(case: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in a path, or options that contradict each other, are told at once: loading the model
    first cost 7-12 s and printed its banner before the error."""
    def load_model(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("seg.model.load_model", load_model)
    (tmp_path / "empty").mkdir()
    missing, out = str(tmp_path / "nowhere"), str(tmp_path / "out")
    args, option, why = {
        "segment": (["segment", missing, "--out", out], "INPUT", "does not exist"),
        "segment-batch": (["segment", missing, "--out", out, "--batch"], "INPUT", "does not exist"),
        "segment-batch-empty": (["segment", str(tmp_path / "empty"), "--out", out, "--batch"], "INPUT",
                                "no DICOM series or NIfTI file under"),
        "evaluate-both": (["evaluate", "--data", str(tmp_path / "empty"), "--phantoms", "2"], "--phantoms",
                          "not both"),
        "evaluate-missing": (["evaluate", "--data", missing], "--data", "does not exist"),
    }[case]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert f"Invalid value for {option}" in res.output and why in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_version_names_the_release() -> None:
    """The conformance statement names a release; an admin could only read it in pyproject.toml."""
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"dicomnode {version('dicomnode')}\n"


def test_an_unknown_atrophied_muscle_is_a_usage_error(tmp_path: Path) -> None:
    """`phantom --atrophy x=0.8` passed the options' checks and ended in a traceback in the renderer."""
    result = CliRunner().invoke(app, ["phantom", "--out", str(tmp_path / "ph"), "--atrophy", "x=0.8"],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "'x' is not a muscle of the class list" in result.output
    assert not (tmp_path / "ph").exists()
