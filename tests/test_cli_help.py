"""Every command's ``--help`` at 80 columns: no value type beside a flag, nothing cut off, no line over,
the description's paragraphs flowing.

Why: typer 0.29 printed ``<bool>`` beside every flag (``--help`` included), as if it took a value, and
in ``train`` the columns that left squeezed the help texts until rich cut words and even an option's
name short ("--image-resampli…"); typer also kept a docstring's source line breaks, so a paragraph
ended short mid-sentence ("(seg/recipe.py): give" / "--phantoms N"). The commands are walked from the
app, so a new one is held to it too.
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


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "dicomnode")
def test_help_description_reads_as_flowing_text(command: tuple[str, ...]) -> None:
    """No line of a command's description ends short while the paragraph goes on."""
    r = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    about = [line.rstrip() for line in lines[next(i for i, x in enumerate(lines) if "Usage:" in x) + 1:]]
    about = about[:next(i for i, line in enumerate(about) if line.lstrip().startswith("╭"))]
    for line, after in zip(about, about[1:], strict=False):
        assert not (line and after) or len(line) > 60, (line, after)


def test_segment_help_counts_the_structures_it_measures() -> None:
    """29 structures (the 30 classes less background), not the model's class count."""
    r = CliRunner().invoke(app, ["segment", "--help"], env={"COLUMNS": "80"})
    assert "29 structures" in r.output and "30 structures" not in r.output
