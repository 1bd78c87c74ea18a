"""Every command's ``--help`` at 80 columns: no value type beside a flag, nothing cut off, no line over.

Why: typer 0.29 printed ``<bool>`` beside every flag (``--help`` included), as if it took a value, and
in ``train`` the columns that left squeezed the help texts until rich cut words and even an option's
name short ("--image-resampli…"). The commands are walked from the app, so a new one is held to it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from dicomnode.cli import app


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


def test_every_command_is_walked() -> None:
    assert {" ".join(c) for c in COMMANDS} >= {"", "serve", "train", "config check", "patients timeline"}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "dicomnode")
def test_help_is_clean_at_80_columns(command: tuple[str, ...]) -> None:
    r = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert "--help" in r.output and "Options" in r.output
    assert "<bool>" not in r.output
    assert "…" not in r.output  # rich cut a word or an option name short
    assert [line for line in r.output.splitlines() if len(line) > 80] == []
