"""Shared fixtures: free ports, a settings object on a temporary storage folder."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dicomnode.config import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(storage_dir=tmp_path / "var", port=free_port(), stable_seconds=1.0, host="127.0.0.1",
                    # disk back-pressure off here; tests/test_disk_pressure.py turns it on
                    min_free_disk_mb=0, max_disk_used_pct=100)
