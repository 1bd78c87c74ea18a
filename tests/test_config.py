import os
import re
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import CONFIG_ENV, ConfigError, Settings, check_file, load_settings

DEPLOY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "node.toml"


def test_file_then_environment_override(tmp_path, monkeypatch):
    cfg = tmp_path / "node.toml"
    cfg.write_text('ae_title = "FROMFILE"\nport = 2000\n[pacs]\nport = 5000\nhost = "10.0.0.9"\n')
    monkeypatch.setenv("DICOMNODE_PACS__PORT", "6000")
    monkeypatch.setenv("DICOMNODE_PORT", "3000")
    s = load_settings(cfg)
    assert s.ae_title == "FROMFILE"
    assert s.port == 3000
    assert s.pacs.port == 6000
    assert s.pacs.host == "10.0.0.9"


def test_a_config_file_does_not_leak_into_later_settings(tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    cfg = tmp_path / "node.toml"
    cfg.write_text('[pacs]\nhost = "10.0.0.9"\n')
    assert load_settings(cfg).pacs.host == "10.0.0.9"
    assert CONFIG_ENV not in os.environ
    assert Settings().pacs.host == "127.0.0.1"
    assert load_settings().pacs.host == "127.0.0.1"


def test_config_file_named_by_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "node.toml"
    cfg.write_text('ae_title = "FROMENV"\n')
    monkeypatch.setenv(CONFIG_ENV, str(cfg))
    assert load_settings().ae_title == "FROMENV"
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "missing.toml"))
    try:
        load_settings()
    except FileNotFoundError as exc:
        assert "missing.toml" in str(exc)
    else:
        raise AssertionError("a missing config file must be an error")


def test_config_show_cli(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('ae_title = "SHOWME"\n')
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "config", "show", "--config", str(cfg)],
                         capture_output=True, text=True, check=True).stdout
    assert "SHOWME" in out


# -- strict configuration: a typo is an error that names the key ----------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(text)
    return cfg


def test_every_section_refuses_unknown_keys() -> None:
    sections = [f for f in Settings.model_fields.values()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]
    assert len(sections) >= 6
    assert all(f.annotation.model_config.get("extra") == "forbid" for f in sections)


def test_unknown_nested_key_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _write(tmp_path, "[send]\natempts = 3\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert "send.atempts: unknown key" in str(err.value)
    assert "attempts, initial_backoff_seconds" in str(err.value)  # what the section does take
    monkeypatch.setenv("DICOMNODE_PACS__HOTS", "10.0.0.9")  # the same typo through the environment
    with pytest.raises(ConfigError, match=r"DICOMNODE_PACS__HOTS: pacs has no key 'hots' \(allowed: "):
        load_settings()


@pytest.mark.parametrize(("variable", "why"), [
    ("DICOMNODE_PROT", "DICOMNODE_PROT: no such setting (settings: ae_title"),
    ("DICOMNODE_PACS_HOST", "DICOMNODE_PACS_HOST: no such setting; did you mean DICOMNODE_PACS__HOST?"),
    ("DICOMNODE_LOGLEVEL", "DICOMNODE_LOGLEVEL: no such setting"),
])
def test_a_variable_that_names_no_setting_is_refused(variable: str, why: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings reads only the names it knows: `DICOMNODE_PROT=12150` or one "_" too few left
    the node on its old port or PACS without a word, though the README promises a typo stops it."""
    monkeypatch.setenv(variable, "12150")
    monkeypatch.setenv("DICOMNODE_CPU_PRECISION", "fp32")  # a knob of one module, not a setting: kept
    with pytest.raises(ConfigError) as err:
        load_settings(_write(tmp_path, 'ae_title = "X"\n'))
    assert why in str(err.value)
    shown = CliRunner().invoke(app, ["config", "show"], env={"COLUMNS": "80"})
    assert shown.exit_code == 2 and why.split(" (")[0] in " ".join(shown.output.split())
    assert "Usage:" not in shown.output  # the problems as `config check` prints them, not a usage box


@pytest.mark.parametrize(("section", "key", "value", "allowed"), [
    ("output", "seg_type", "binry", "'FRACTIONAL', 'BINARY' or 'LABELMAP'"),
    ("output", "labelmap_compression", "jpeg", "'RLE' or 'JPEGLS'"),
    ("worker", "device", "gpu", "auto, cpu, cuda or cuda:N"),
])
def test_bad_choice_is_refused_with_the_allowed_values(tmp_path: Path, section: str, key: str, value: str,
                                                        allowed: str) -> None:
    cfg = _write(tmp_path, f'[{section}]\n{key} = "{value}"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert f"{section}.{key}: must be" in str(err.value) and allowed in str(err.value)


def test_choices_accept_every_documented_value(tmp_path: Path) -> None:
    cfg = _write(tmp_path, 'log_level = "debug"\n[output]\nseg_type = "labelmap"\n'
                           'labelmap_compression = "JPEGLS"\n[worker]\ndevice = "cuda:1"\n')
    s = load_settings(cfg)
    assert (s.log_level, s.output.seg_type, s.output.labelmap_compression) == ("DEBUG", "LABELMAP", "JPEGLS")
    assert s.worker.device == "cuda:1"


def test_config_check_valid_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMNODE_PORT", "not-a-port")  # the check judges the file alone
    result = CliRunner().invoke(app, ["config", "check", str(DEPLOY_CONFIG)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "THIGHNODE on 0.0.0.0:11112" in result.output


@pytest.mark.parametrize(("text", "expected"), [
    ("[send]\natempts = 3\n", "send.atempts: unknown key"),
    ("[pairing]\nadmission_window = 21\n", "pairing.admission_window: unknown key"),
    ('[output]\nseg_type = "binry"\n', "output.seg_type: must be 'FRACTIONAL', 'BINARY' or 'LABELMAP'"),
    ('[output]\nseg_type = "binry"\n', "(got 'binry')"),  # as written, not upper-cased
    ('log_level = "verbose"\n', "log_level: must be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL' "
                                "(got 'verbose')"),
    ("[tls]\nmin_version = 1.25\n", "tls.min_version: must be '1.2' or '1.3' (got 1.25)"),
    ("port = [\n", "not valid TOML"),
])
def test_config_check_bad_file_exits_2(tmp_path: Path, text: str, expected: str) -> None:
    result = CliRunner().invoke(app, ["config", "check", str(_write(tmp_path, text))])
    assert result.exit_code == 2 and expected in " ".join(result.output.split())


@pytest.mark.parametrize(("text", "expected"), [
    ("port = 99999\n", "port: Input should be less than or equal to 65535"),
    ("[pacs]\nport = 0\n", "pacs.port: Input should be greater than or equal to 1"),
    ('[pacs]\nhost = " "\n', "pacs.host: must not be empty"),
    ('ae_title = "BAD TITLE WITH SPACES"\n', "ae_title: at most 16 characters, not 21"),
    ('ae_title = "  "\n', "ae_title: must not be empty"),
    ('[pacs]\nae_title = "PACS\\\\A"\n', "pacs.ae_title: printable ASCII characters only, no backslash"),
    ('allowed_calling_aets = ["ORTHANC", "A_CALLING_TITLE_OF_29_LETTERS"]\n',
     "allowed_calling_aets.1: at most 16 characters"),
    ("stable_seconds = -1\n", "stable_seconds: Input should be greater than or equal to 0"),
    ("[send]\nattempts = 0\n", "send.attempts: Input should be greater than or equal to 1"),
    ("[pairing]\nadmission_window_days = 0\n",
     "pairing.admission_window_days: Input should be greater than or equal to 1"),
    ("[pairing]\nadmission_window_days = 366\n",
     "pairing.admission_window_days: Input should be less than or equal to 365"),
    ("[pairing]\nadmission_window_days = 14.5\n", "pairing.admission_window_days: Input should be a"
                                                  " valid integer, got a number with a fractional part"),
    ("[pairing]\nadmission_window_days = true\n",
     "pairing.admission_window_days: must be a whole number, not true or false"),
    ('model_path = "/nonexistent/model"\n', "model_path: no model package at /nonexistent/model"),
])
def test_config_check_refuses_what_serve_could_not_use(tmp_path: Path, text: str, expected: str) -> None:
    """What the listener, the sender or the worker would only trip over later (a traceback at bind,
    every job failing on a missing model) is refused by the check, with the key's name."""
    result = CliRunner().invoke(app, ["config", "check", str(_write(tmp_path, text))])
    assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output


def _numeric_keys(model: type, prefix: str = "") -> list[str]:
    """Every number setting's dotted key (whole or not, optional or not), tables walked."""
    keys = []
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            keys += _numeric_keys(kind, f"{prefix}{name}.")
        elif {typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a
              for a in (typing.get_args(kind) or (kind,))} - {type(None)} <= {int, float}:
            keys.append(prefix + name)
    return keys


def test_no_number_setting_takes_true_or_false(tmp_path: Path) -> None:
    """pydantic reads ``true`` as 1: ``attempts = true`` (a switch on the wrong key) would have set
    one attempt without a word. Every number refuses a switch, by its key."""
    keys = _numeric_keys(Settings)
    assert {"port", "send.attempts", "stable_seconds", "pairing.admission_window_days",
            "retention_days", "worker.timeout_seconds"} <= set(keys)
    for key in keys:
        table, _, name = key.rpartition(".")
        text = (f"[{table}]\n" if table else "") + f"{name} = true\n"
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}: must be a (whole )?number, not true"):
            load_settings(_write(tmp_path, text))


def test_the_admission_period_is_set_in_days(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pairing.admission_window_days``: 14 unless a site sets it, from the file or the
    environment (above the file), 1 to 365 both included."""
    assert Settings().pairing.admission_window_days == 14
    cfg = _write(tmp_path, "[pairing]\nadmission_window_days = 30\n")
    assert load_settings(cfg).pairing.admission_window_days == 30
    monkeypatch.setenv("DICOMNODE_PAIRING__ADMISSION_WINDOW_DAYS", "21")
    assert load_settings(cfg).pairing.admission_window_days == 21
    for days in ("1", "365"):
        monkeypatch.setenv("DICOMNODE_PAIRING__ADMISSION_WINDOW_DAYS", days)
        assert load_settings().pairing.admission_window_days == int(days)


def test_an_ae_title_keeps_no_padding(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, 'ae_title = " THIGHNODE "\nallowed_calling_aets = ["ORTHANC "]\n'))
    assert (s.ae_title, s.allowed_calling_aets) == ("THIGHNODE", ["ORTHANC"])


def test_a_taken_port_stops_serve_with_one_line(tmp_path: Path) -> None:
    """An old node still listening: `serve` says so in one line (exit 2), no traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        cfg = _write(tmp_path, f'storage_dir = "{(tmp_path / "var").as_posix()}"\nhost = "127.0.0.1"\n'
                               f"port = {port}\n")
        result = subprocess.run([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(cfg)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"cannot start: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("where", ["under-a-file", "a-file"])
def test_a_storage_dir_that_cannot_be_a_folder_stops_serve_with_its_key(tmp_path: Path, where: str) -> None:
    """A storage_dir the node cannot create or use: `serve` names the key and why (exit 2), and writes
    nothing; it was a traceback from the index's mkdir."""
    (tmp_path / "afile").write_text("")
    storage = tmp_path / "afile" / "var" if where == "under-a-file" else tmp_path / "afile"
    cfg = _write(tmp_path, f'storage_dir = "{storage.as_posix()}"\nhost = "127.0.0.1"\nport = 1\n')
    umask = os.umask(0o022)  # serve restricts the process's umask before it checks the folder
    try:
        result = CliRunner().invoke(app, ["serve", "--no-worker", "--config", str(cfg)],
                                    env={"COLUMNS": "400"})
    finally:
        os.umask(umask)
    out = " ".join(result.output.split())
    assert result.exit_code == 2, (result.output, result.exception)
    why = f"cannot create {storage}: {tmp_path / 'afile'} is a file" if where == "under-a-file" \
        else f"{storage} is a file, not a folder"
    assert f"cannot start: storage_dir: {why}" in out, out
    assert (tmp_path / "afile").read_text() == ""


def test_calling_titles_from_the_environment_as_a_comma_list_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit file's ``Environment=DICOMNODE_ALLOWED_CALLING_AETS=ORTHANC,PACS2`` is two titles; a title
    that DICOM would refuse is refused by name, as from the file."""
    monkeypatch.setenv("DICOMNODE_ALLOWED_CALLING_AETS", "ORTHANC, PACS2")
    assert load_settings().allowed_calling_aets == ["ORTHANC", "PACS2"]
    monkeypatch.setenv("DICOMNODE_ALLOWED_CALLING_AETS", '["A", "B"]')
    assert load_settings().allowed_calling_aets == ["A", "B"]
    monkeypatch.setenv("DICOMNODE_ALLOWED_CALLING_AETS", "ORTHANC,A_TITLE_FAR_TOO_LONG")
    with pytest.raises(ConfigError, match="allowed_calling_aets.1: at most 16 characters"):
        load_settings()


def test_a_model_package_that_does_not_verify_stops_check_and_serve(tmp_path: Path) -> None:
    """Weights that are not the ones model.json names: `config check` says so (exit 2), and `serve`
    does not start a node whose every job would fail on it."""
    import shutil

    from seg.package import DEMO_DIR

    site = tmp_path / "site"
    shutil.copytree(DEMO_DIR, site)
    with (site / "model.safetensors").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\0\0\0\0")
    cfg = _write(tmp_path, f'model_path = "{site.as_posix()}"\n'
                           f'storage_dir = "{(tmp_path / "var").as_posix()}"\nhost = "127.0.0.1"\nport = 1\n')
    result = CliRunner().invoke(app, ["config", "check", str(cfg)])
    assert result.exit_code == 2 and "model_path:" in result.output and "checksum mismatch" in result.output
    served = subprocess.run([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=120)
    assert served.returncode == 2 and "cannot start: model_path:" in " ".join(served.stderr.split())
    assert "checksum mismatch" in served.stderr and "Traceback" not in served.stderr


def test_relative_paths_in_a_file_are_relative_to_its_folder(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`dicomnode serve --config /etc/dicomnode/node.toml` from systemd's or cron's working directory
    finds the storage, the model package and the TLS files beside the file; a path in the environment
    stays relative to the working directory."""
    import shutil

    from seg.package import DEMO_DIR

    etc = tmp_path / "etc"
    shutil.copytree(DEMO_DIR, etc / "models" / "site")
    (etc / "tls").mkdir()
    for name in ("node.pem", "node.key", "ca.pem"):
        (etc / "tls" / name).write_text("PEM")
    cfg = _write(etc, 'storage_dir = "var"\nmodel_path = "models/site"\n[tls]\nenabled = true\n'
                      'certificate = "tls/node.pem"\nprivate_key = "./tls/node.key"\n'
                      f'ca_certificates = "{(etc / "tls" / "ca.pem").as_posix()}"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("DICOMNODE_STORAGE_DIR", raising=False)
    for s in (load_settings(Path("..") / "etc" / "node.toml"), check_file(cfg)):
        found = [s.storage_dir, s.model_path, s.tls.certificate, s.tls.private_key, s.tls.ca_certificates]
        names = ("var", "models/site", "tls/node.pem", "tls/node.key", "tls/ca.pem")
        assert [p.resolve() for p in found if p is not None] == [(etc / n).resolve() for n in names]
    result = CliRunner().invoke(app, ["config", "check", str(cfg)])
    assert result.exit_code == 0 and "valid" in result.output, result.output
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # "~" in a file: the home folder, not a "~" folder
    (tmp_path / "home-cfg").mkdir()
    home = _write(tmp_path / "home-cfg", 'storage_dir = "~/dicomnode"\n')
    assert load_settings(home).storage_dir == tmp_path / "home" / "dicomnode"
    # the environment: the working directory's, and "~" the home folder (it made a folder named "~"),
    # each shown as the node uses it (`config show` printed "state")
    monkeypatch.setenv("DICOMNODE_STORAGE_DIR", "state")
    assert load_settings(cfg).storage_dir == elsewhere / "state"
    monkeypatch.setenv("DICOMNODE_STORAGE_DIR", "~/state")
    assert load_settings(cfg).storage_dir == tmp_path / "home" / "state"
    monkeypatch.delenv("DICOMNODE_STORAGE_DIR")
    assert Settings().storage_dir == elsewhere / "var"  # the default too
    monkeypatch.setenv("DICOMNODE_MODEL_PATH", "nowhere")
    with pytest.raises(ConfigError, match=f"model_path: no model package at {elsewhere / 'nowhere'}"):
        load_settings(cfg)


def test_every_path_setting_is_anchored() -> None:
    """A path setting added later is anchored too: every Path-typed key is found by its type."""
    from dicomnode.config import _anchored

    values = {"storage_dir": "var", "model_path": "/abs/model", "ae_title": "var", "unknown": "x",
              "tls": {"certificate": "c.pem", "min_version": "1.2"}, "pacs": {"host": "h"}}
    assert _anchored(values, Path("/etc/node")) == {
        "storage_dir": "/etc/node/var", "model_path": "/abs/model", "ae_title": "var", "unknown": "x",
        "tls": {"certificate": "/etc/node/c.pem", "min_version": "1.2"}, "pacs": {"host": "h"}}


def test_a_package_with_absurd_weights_stops_check_and_serve(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A weights file over the size limit (here lowered below the demo's) is refused in one line by
    `config check` and by `serve` before it starts, the file never hashed."""
    import shutil

    import seg.package as package
    from seg.package import DEMO_DIR

    shutil.copytree(DEMO_DIR, tmp_path / "site")
    cfg = _write(tmp_path, f'model_path = "site"\nstorage_dir = "{(tmp_path / "var").as_posix()}"\n')
    monkeypatch.setattr(package, "MAX_WEIGHTS_BYTES", 1024)
    monkeypatch.setattr(package, "sha256_file", lambda _: pytest.fail("an absurd file was hashed"))
    checked = CliRunner().invoke(app, ["config", "check", str(cfg)])
    umask = os.umask(0o022)  # serve restricts the process's umask before it checks the package
    try:
        served = CliRunner().invoke(app, ["serve", "--config", str(cfg)])
    finally:
        os.umask(umask)
    for result, prefix in ((checked, "model_path:"), (served, "cannot start: model_path:")):
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and prefix in text and "a model package may hold" in text, result.output
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize(("worker", "command", "why"), [
    ('device = "cuda"', "serve", "worker.device: 'cuda', but PyTorch sees 0 CUDA GPU(s) here"),
    ('device = "cuda:0"\nruntime = "openvino"', "config check",
     "worker.runtime: 'openvino' runs on the CPU only, not on worker.device 'cuda:0'"),
    ('runtime = "openvino"', "config check", "worker.runtime: 'openvino' is not installed here"),
])
def test_a_worker_that_cannot_run_is_refused_before_the_first_job(worker: str, command: str, why: str,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A runtime or device this machine cannot run passed `config check` and `serve`; then every job
    failed after its retries, each with the same reason."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    monkeypatch.setattr("seg.runtime.openvino_installed", lambda: False)
    cfg = _write(tmp_path, f'storage_dir = "{(tmp_path / "var").as_posix()}"\nhost = "127.0.0.1"\n'
                           f'port = 1\n[worker]\n{worker}\n')
    args = ["config", "check", str(cfg)] if command == "config check" else ["serve", "--config", str(cfg)]
    umask = os.umask(0o022)  # serve restricts the process's umask
    try:
        result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    finally:
        os.umask(umask)
    assert result.exit_code == 2 and why in " ".join(result.output.split()), result.output
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("line", ['log_json = "yes"', "series_complete_on_release = 1",
                                  '[tls]\nenabled = "off"', '[output]\nsummary = "no"'])
def test_every_switch_is_true_or_false(line: str, tmp_path: Path) -> None:
    """`ops.enabled = "yes"` was refused while `log_json = "yes"`, `... = 1` or `enabled = "off"` in
    [tls] passed as pydantic read them: one rule for every on/off setting."""
    with pytest.raises(ConfigError, match="must be true or false"):
        check_file(_write(tmp_path, line + "\n"))


def test_calling_aet_hosts_from_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable wanted JSON and said only "error parsing value for field"."""
    monkeypatch.setenv("DICOMNODE_CALLING_AET_HOSTS", "ORTHANC=10.0.0.5;PACS2=10.0.0.6, 10.0.0.7")
    assert load_settings().calling_aet_hosts == {"ORTHANC": ["10.0.0.5"], "PACS2": ["10.0.0.6", "10.0.0.7"]}
    monkeypatch.setenv("DICOMNODE_CALLING_AET_HOSTS", '{"ORTHANC": ["10.0.0.5"]}')
    assert load_settings().calling_aet_hosts == {"ORTHANC": ["10.0.0.5"]}
    monkeypatch.setenv("DICOMNODE_CALLING_AET_HOSTS", "ORTHANC")
    with pytest.raises(ConfigError, match=r"calling_aet_hosts: give AE=host\[,host\];AE2=host"):
        load_settings()


def test_a_cpu_precision_typo_is_refused_before_any_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """`DICOMNODE_CPU_PRECISION=bf61` meant fp32 to PyTorch without a word (OpenVINO refused it in each
    job): the node's settings refuse it, and so does inference."""
    from seg.infer import default_precision

    monkeypatch.setenv("DICOMNODE_CPU_PRECISION", "bf61")
    with pytest.raises(ConfigError, match="DICOMNODE_CPU_PRECISION 'bf61' is not one of auto, fp32, bf16"):
        load_settings()
    with pytest.raises(ValueError, match="bf61"):
        default_precision()
    monkeypatch.setenv("DICOMNODE_CPU_PRECISION", "bf16")
    assert load_settings() is not None and default_precision() == "bf16"
