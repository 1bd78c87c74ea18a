import os
import subprocess
import sys

from dicomnode.config import CONFIG_ENV, Settings, load_settings


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
