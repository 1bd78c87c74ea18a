"""The ``dicomnode`` console command: one Typer app, sub-commands registered by topic.

Each module under :mod:`dicomnode.commands` adds its sub-commands with ``register(app)`` and
imports heavy libraries (torch, highdicom) inside the command bodies so ``--help`` stays fast.
"""

from __future__ import annotations

import inspect

import typer

from dicomnode.commands import demo, node, patients, phantom, report, segmentation

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


for module in (node, phantom, segmentation, report, patients, demo):
    module.register(app)
flow_help(app)


if __name__ == "__main__":
    app()
