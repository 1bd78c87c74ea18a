"""Options shared by every sub-command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dicomnode.config import Settings, load_settings

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file (DICOMNODE_* variables override it).",
                 exists=False, dir_okay=False),
]


def settings_from(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc


def spacing_option(text: str) -> tuple[float, float, float]:
    """A ``--spacing`` value (one or three positive mm) for typer: one parser for every command."""
    from dicomnode.harness.net import parse_spacing

    try:
        return parse_spacing(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def cell(v: float | None, fmt: str) -> str:
    """A number in a text table: "-" when missing, and a value that rounds to zero without a sign
    ("0.0", not "-0.0" or "+0.0")."""
    if v is None:
        return "-"
    text = format(v, fmt)
    return format(0.0, fmt.replace("+", "")) if float(text) == 0 else text
