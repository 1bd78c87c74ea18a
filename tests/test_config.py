import subprocess
import sys

from dicomnode.config import load_settings


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


def test_config_show_cli(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('ae_title = "SHOWME"\n')
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "config", "show", "--config", str(cfg)],
                         capture_output=True, text=True, check=True).stdout
    assert "SHOWME" in out
