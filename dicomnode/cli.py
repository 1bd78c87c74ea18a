"""The ``dicomnode`` console command: one Typer app, sub-commands registered by topic.

Each module under :mod:`dicomnode.commands` adds its sub-commands with ``register(app)`` and
imports heavy libraries (torch, highdicom) inside the command bodies so ``--help`` stays fast.
"""

from __future__ import annotations

import typer

from dicomnode.commands import demo, node, patients, phantom, report, segmentation

app = typer.Typer(
    name="dicomnode",
    help="PACS-integrated DICOM node for thigh-muscle volumetry after hip fracture.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

for module in (node, phantom, segmentation, report, patients, demo):
    module.register(app)


if __name__ == "__main__":
    app()
