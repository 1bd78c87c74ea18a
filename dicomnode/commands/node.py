"""Sub-commands that run and operate the node: serve, config show, jobs, echo, retry."""

from __future__ import annotations

import typer
from rich.console import Console

from dicomnode.commands.common import ConfigOption, settings_from

config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration (defaults < file < DICOMNODE_* environment) as TOML-like JSON."""
    settings = settings_from(config)
    Console().print_json(settings.model_dump_json())


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
