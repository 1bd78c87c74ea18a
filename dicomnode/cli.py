"""The ``dicomnode`` console command: one Typer app, sub-commands registered by topic.

Each module under :mod:`dicomnode.commands` adds its sub-commands with ``register(app)`` and
imports heavy libraries (torch, highdicom) inside the command bodies so ``--help`` stays fast.
"""

from __future__ import annotations

import inspect
from typing import Any

import typer
from typer.core import TyperOption

from dicomnode.commands import demo, node, patients, phantom, priors, report, segmentation

app = typer.Typer(
    name="dicomnode",
    help="PACS-integrated DICOM node for thigh-muscle volumetry after hip fracture.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    """``--version``: the release the conformance statement describes (docs/conformance.md)."""
    if value:
        from importlib.metadata import version

        typer.echo(f"dicomnode {version('dicomnode')}")
        raise typer.Exit


@app.callback()
def main(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                           help="Print the release and exit.")) -> None:
    """PACS-integrated DICOM node for thigh-muscle volumetry after hip fracture."""



def flowing(doc: str | None) -> str:
    """A docstring as help text, each paragraph one line: typer keeps the source's line breaks in the
    paragraphs after the first, which broke ``--help`` mid-sentence; rich fills each line instead."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc or "").split("\n\n"))


def flow_help(group: typer.Typer) -> None:
    """Every command's help (sub-groups' too) as :func:`flowing` text, one rule for the whole CLI."""
    for info in group.registered_commands:
        info.help = flowing(info.help or (info.callback.__doc__ if info.callback else None))
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            flow_help(sub.typer_instance)


def no_type_beside_flags() -> None:
    """Show no value type beside a flag (``--help``, ``--dice-batch/--no-dice-batch``): it takes no
    value, yet typer 0.29 printed ``<bool>`` there, which read as one to give and took the width the
    option texts need at 80 columns. Value types (``<path>``, ``<int>``) stay."""
    shown = TyperOption.display_type_rich
    if getattr(shown, "flags_untyped", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag or self.count else shown(self, ctx)

    display_type_rich.flags_untyped = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


no_type_beside_flags()
for module in (node, phantom, segmentation, report, patients, priors, demo):
    module.register(app)
flow_help(app)


if __name__ == "__main__":
    app()
