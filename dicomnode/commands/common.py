"""Options shared by every sub-command."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from dicomnode.config import Settings, load_settings
from seg.metal_proximity import NEAR_METAL_MARK
from seg.records import LeftRight, ModelInfo, StructureVolume, VolumeRecord
from seg.terminal import COLUMNS

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file (DICOMNODE_* variables override it).",
                 exists=False, dir_okay=False),
]


def echo_problems(text: str) -> None:
    """Each problem on stderr within 80 columns, its key first and its continuation indented."""
    for line in text.splitlines():
        indent = " " * (len(line) - len(line.lstrip()))
        typer.echo(textwrap.fill(line.lstrip(), COLUMNS, initial_indent=indent,
                                 subsequent_indent=indent + "  ", break_long_words=False,
                                 break_on_hyphens=False), err=True)


def wrapped(text: str, first: str, rest: str) -> str:
    """``text`` within the line width, after ``first`` and with continuation lines after ``rest``;
    hyphenated words stay whole."""
    return textwrap.fill(text, COLUMNS, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)


def settings_from(config: Path | None) -> Settings:
    """The settings every command reads; a bad file, key, value or ``DICOMNODE_*`` variable ends it
    with exit 2 and each problem on a line of its own, as ``config check`` prints them (it was a
    usage box that folded the lines mid-phrase)."""
    try:
        return load_settings(config)
    except (FileNotFoundError, ValueError) as exc:
        echo_problems(str(exc))
        raise typer.Exit(2) from exc


def node_settings(config: Path | None) -> Settings:
    """The settings of a node that has run: commands that read its index refuse a storage folder
    without one instead of creating it empty, where a forgotten ``--config`` would show "no jobs".
    An index this user may not read (the node's storage is its service user's: folders 0750, index
    0600) is said to be so, with what to do; it was a PermissionError traceback."""
    settings = settings_from(config)
    try:
        with settings.db_path.open("rb"):
            pass
    except (FileNotFoundError, NotADirectoryError) as exc:
        echo_problems(f"no node index at {settings.db_path} (storage_dir {settings.storage_dir}): the "
                      "node has not run on this storage_dir, or this is not its configuration: name "
                      "it with --config FILE or DICOMNODE_CONFIG")
        raise typer.Exit(2) from exc
    except PermissionError as exc:
        echo_problems(f"cannot read the node index at {settings.db_path}: permission denied. The "
                      "node's storage is its service user's: run this command as that user, e.g. "
                      "sudo -u dicomnode dicomnode ... --config /etc/dicomnode/node.toml")
        raise typer.Exit(2) from exc
    except OSError as exc:
        echo_problems(f"cannot read the node index at {settings.db_path}: {exc.strerror or exc}")
        raise typer.Exit(2) from exc
    return settings


def parse_spacing(text: str) -> tuple[float, float, float]:
    """A voxel size from ``"3"``, ``"3,3,5"``, ``"3x3x5"`` or ``"3×3×5"`` (mm; column, row, slice).

    Raises ValueError unless it is one or three positive numbers.
    """
    try:
        parts = [float(p) for p in text.replace("×", ",").replace("x", ",").split(",") if p.strip()]
    except ValueError as exc:
        raise ValueError(f"not a spacing: {text!r}; give one or three positive numbers, e.g. 3,3,5") from exc
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or min(parts) <= 0:
        raise ValueError(f"not a spacing: {text!r}; give one or three positive numbers, e.g. 3,3,5")
    return parts[0], parts[1], parts[2]


def spacing_option(text: str) -> tuple[float, float, float]:
    """A ``--spacing`` value (one or three positive mm) for typer: one parser for every command."""
    try:
        return parse_spacing(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def device_option(text: str) -> str:
    """A ``--device`` value (auto, cpu, cuda, cuda:N): one check for every command."""
    from seg.recipe import check_device

    try:
        return check_device(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def z_range_option(text: str | None, option: str = "--z-range") -> tuple[float, float] | None:
    """A ``lo,hi`` range in mm (``phantom``, ``train``, ``evaluate``): one parser, so "1,2,3" or
    "a,b" is a usage error naming the option everywhere (it was a traceback in two of three)."""
    if not text:
        return None
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 2 or not parts[0] < parts[1]:
        raise typer.BadParameter(f"give two numbers lo,hi in mm with lo < hi, e.g. -60,30 (got {text!r})",
                                 param_hint=option)
    return parts[0], parts[1]


def case_source(data: Path | None, phantoms: int) -> None:
    """One source of cases for ``train`` and ``evaluate``, checked before anything loads: with both,
    --phantoms was silently ignored and the figures were not of what was asked."""
    if data is None and phantoms <= 0:
        raise typer.BadParameter("give --data DIR or --phantoms N")
    if data is not None and phantoms > 0:
        raise typer.BadParameter("give --data DIR or --phantoms N, not both", param_hint="--phantoms")
    if data is not None and not data.is_dir():
        raise typer.BadParameter(f"dataset folder {data} does not exist", param_hint="--data")


def cell(v: float | None, fmt: str) -> str:
    """A number in a text table: "-" when missing, and a value that rounds to zero without a sign
    ("0.0", not "-0.0" or "+0.0")."""
    if v is None:
        return "-"
    text = format(v, fmt)
    return format(0.0, fmt.replace("+", "")) if float(text) == 0 else text


def volumes_table(rec: VolumeRecord) -> str:
    """One series' volumes as a reader wants them on the terminal, within 80 columns: each structure
    by its display name, left, right and total cm³ and the height-normalised cm³/m², then the 21
    analysed muscles together and the height used. A side next to the implant is marked † (the
    summary page's mark), with a line saying what it means."""
    from seg.labels import ANALYSED_MUSCLES, by_name

    marked = any(st.near_metal("both") for st in rec.structures)
    pad = 2 if marked else 0  # the mark's room after each side's number, so the decimals align

    def side(st: StructureVolume, which: LeftRight) -> str:
        text = cell(st.side_volume(which), ".1f")
        return f"{text} {NEAR_METAL_MARK}" if st.near_metal(which) else text + " " * pad

    gap = " " * pad
    head = f"{'structure':<24}{'left cm³':>11}{gap}{'right cm³':>11}{gap}{'total cm³':>11}{'cm³/m²':>10}"
    lines = [head, "-" * len(head)]
    for st in sorted(rec.structures, key=lambda s: s.label):
        lines.append(f"{by_name(st.name).display_name:<24}{side(st, 'left'):>{11 + pad}}"
                     f"{side(st, 'right'):>{11 + pad}}{cell(st.volume_cm3, '.1f'):>11}"
                     f"{cell(st.index_cm3_m2, '.1f'):>10}")
    analysed = [st for st in rec.structures if st.name in ANALYSED_MUSCLES]
    if analysed:
        def total(values: list[float | None]) -> float | None:
            return None if any(v is None for v in values) else sum(v for v in values if v is not None)

        lines.append(f"{f'the {len(analysed)} analysed muscles':<24}"
                     f"{cell(total([s.left_cm3 for s in analysed]), '.1f'):>11}{gap}"
                     f"{cell(total([s.right_cm3 for s in analysed]), '.1f'):>11}{gap}"
                     f"{cell(total([s.volume_cm3 for s in analysed]), '.1f'):>11}"
                     f"{cell(total([s.index_cm3_m2 for s in analysed]), '.1f'):>10}")
    if marked:
        lines.append(f"{NEAR_METAL_MARK} next to the metal implant: the least reliable volumes")
    if rec.height_m:
        lines.append(f"height {rec.height_m:.2f} m ({rec.height_source})")
    elif (rec.height_source or "").startswith("implausible"):  # e.g. a PatientSize written in cm
        lines.append(f"height not used, {rec.height_source}: no cm³/m²")
    else:
        lines.append("height unknown: no cm³/m²")
    return "\n".join(lines)


@contextmanager
def bad_input(param_hint: str) -> Iterator[None]:
    """A file or folder the user named that cannot be read as asked (missing, not a CT series, a label
    map off the CT's grid) ends the command as a usage error naming the option, not a traceback."""
    from nibabel.filebasedimages import ImageFileError

    try:
        yield
    except (OSError, ValueError, ImageFileError) as exc:
        raise typer.BadParameter(str(exc), param_hint=param_hint) from exc


def model_lines(info: ModelInfo, width: int = COLUMNS) -> list[str]:
    """The model that measured, for the terminal: ``model NAME VERSION: STATEMENT`` (a demo model's
    "phantom-trained demonstration model, not for clinical measurement"), the statement on a line of
    its own when the two do not fit ``width`` (a terminal folding it left a trailing space)."""
    from seg.package import DEMO_STATEMENT

    head = f"model {info.name} {info.version}"
    statement = info.statement or (DEMO_STATEMENT if info.demo else "")
    if not statement:
        return [head]
    one = f"{head}: {statement}"
    return [one] if len(one) <= width else [f"{head}:", f"  {statement}"]
