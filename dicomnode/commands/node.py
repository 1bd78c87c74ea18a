"""Sub-commands that run and operate the node: serve, config show/check, jobs, status, echo, retry."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from dicomnode.commands.common import ConfigOption, echo_problems, node_settings, settings_from
from dicomnode.config import Settings
from dicomnode.processing.jobs import JobState, JobView
from dicomnode.timefmt import duration, local_time, short_uid

config_app = typer.Typer(help="Inspect and check the configuration.", no_args_is_help=True)


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration (defaults < file < DICOMNODE_* environment) as TOML-like JSON."""
    settings = settings_from(config)
    Console().print_json(settings.model_dump_json())


def config_summary(settings: Settings) -> str:
    """The few facts an administrator checks after editing node.toml: who listens, where results go."""
    model = settings.model_path or "shipped phantom-trained demo model"
    return (f"listens  {settings.ae_title} on {settings.host}:{settings.port}\n"
            f"storage  {settings.storage_dir}\n"
            f"results  to {settings.pacs.ae_title}@{settings.pacs.host}:{settings.pacs.port}, "
            f"SEG {settings.output.seg_type}, device {settings.worker.device}\n"
            f"model    {model}")


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="TOML configuration file to validate.", dir_okay=False)],
) -> None:
    """Validate a configuration file on its own (no DICOMNODE_* variables) without starting anything.

    Exit 0 and a short summary when valid; exit 2 with every unknown key and bad value otherwise.
    """
    from dicomnode.config import check_file

    try:
        settings = check_file(file)
    except (FileNotFoundError, ValueError) as exc:  # ConfigError is a ValueError
        echo_problems(str(exc))
        raise typer.Exit(2) from exc
    problems = worker_problems(settings)
    if problems:
        echo_problems(f"invalid configuration ({file}):\n" + "\n".join(f"  {p}" for p in problems))
        raise typer.Exit(2)
    typer.echo(f"{file}: valid\n{config_summary(settings)}")


def worker_problems(settings: Settings, *, gpu: bool = False) -> list[str]:
    """Why the worker could run no job with these settings, as ``key: problem`` lines: the model
    package (metadata, classes, the weights' checksum: :func:`seg.package.verify_package`; the shipped
    demo model is not checked), an OpenVINO runtime that is not installed or asked for a GPU, and with
    ``gpu`` (``serve``, which loads PyTorch anyway) a CUDA device PyTorch does not see. Each passed
    ``config check`` and ``serve``, then failed every job after its retries."""
    from seg.package import ModelPackageError, verify_package

    problems = []
    if settings.model_path is not None:
        try:
            verify_package(settings.model_path)
        except ModelPackageError as exc:
            problems.append(f"model_path: {exc}")
    device, runtime = settings.worker.device, settings.worker.runtime
    if runtime == "openvino":
        from seg.runtime import openvino_installed

        if device.startswith("cuda"):
            problems.append(f"worker.runtime: 'openvino' runs on the CPU only, not on worker.device "
                            f"{device!r}")
        elif not openvino_installed():
            problems.append("worker.runtime: 'openvino' is not installed here: pip install "
                            "'dicomnode[openvino]', or runtime = \"auto\"")
    if gpu and device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            seen = torch.cuda.device_count()
            problems.append(f"worker.device: {device!r}, but PyTorch sees {seen} CUDA GPU(s) here"
                            + ("" if torch.cuda.is_available() else " (a CPU build, or no driver)"))
    return problems


def storage_problems(folder: Path) -> list[str]:
    """Why the node could not keep its data in ``folder`` (or create it), as ``key: problem`` lines,
    checked without writing anything. Why: a storage_dir under a file or in a folder the service
    user may not write was a traceback from the index's mkdir instead of the key and the reason."""
    existing = folder
    while not os.path.exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        return [f"storage_dir: {folder} is a file, not a folder" if existing == folder
                else f"storage_dir: cannot create {folder}: {existing} is a file"]
    if not os.access(existing, os.W_OK | os.X_OK):
        where = f"{folder} is" if existing == folder else f"cannot create {folder}: {existing} is"
        return [f"storage_dir: {where} not writable by this user (uid {os.geteuid()}): give it to the "
                "node's user (chown), or choose another storage_dir"]
    return []


def serve(
    config: ConfigOption = None,
    pipeline: Annotated[
        str | None,
        typer.Option(
            help="Pipeline as module:function (default dicomnode.processing.pipeline:run_pipeline; "
            "env DICOMNODE_PIPELINE)."
        ),
    ] = None,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="Receive and select only; run no jobs.")
    ] = False,
) -> None:
    """Run the node: DICOM listener (C-ECHO, C-STORE), series watcher, worker and sender, until Ctrl-C."""
    from dicomnode.logs import setup_logging
    from dicomnode.network.scp import ListenError
    from dicomnode.network.tls import TlsError
    from dicomnode.ops.page import OpsPageError
    from dicomnode.server import Node
    from dicomnode.storage.node_lock import NodeLockError
    from dicomnode.storage.store import restrict_umask

    restrict_umask()  # PHI at rest: everything the node writes is closed to other local users
    settings = settings_from(config)
    problems = storage_problems(settings.storage_dir) + worker_problems(settings, gpu=not no_worker)
    if problems:  # every job would fail on it: say so now, not in each job's reason
        echo_problems("cannot start:\n" + "\n".join(f"  {p}" for p in problems))
        raise typer.Exit(2)
    setup_logging(settings.log_level, settings.log_json)
    try:
        Node(settings, pipeline=pipeline, worker_enabled=False if no_worker else None).serve_forever()
    # a certificate, key or CA that cannot be loaded, the DICOM port or the ops page's port taken, the
    # storage folder held by another node: one clear line, no traceback
    except (TlsError, OpsPageError, ListenError, NodeLockError) as exc:
        typer.echo(f"cannot start: {exc}", err=True)
        raise typer.Exit(2) from exc


def jobs(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    state: Annotated[JobState | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (newest first).")] = 50,
) -> None:
    """List jobs, newest first, with their state, timing and sends.

    Each job: pseudonymised patient, instances, state, when received, how long it waited and ran,
    outputs sent; below it, the series (last digits of its UID) and the reason. Within the terminal's
    width on a terminal; piped, each reason stays on one line for grep."""
    from dicomnode.db import opened
    from dicomnode.processing import jobs as lifecycle

    settings = node_settings(config)
    with opened(settings.db_path) as db:
        views = lifecycle.listing(db, state, limit)
    if as_json:
        typer.echo(json.dumps([job_json(v) for v in views], indent=2))
        return
    width = shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else None
    typer.echo(f"jobs in {settings.db_path}, newest first" if views else f"no jobs in {settings.db_path}")
    for line in job_lines(views, width):
        typer.echo(line)


def job_json(view: JobView) -> dict[str, Any]:
    """One job of ``jobs --json``: every field of the view, after ``job`` (its id again, kept for
    the scripts that read it)."""
    return {"job": view.id, **asdict(view)}


_STATE_COLOURS = {JobState.DONE: "green", JobState.FAILED: "red", JobState.REJECTED: "yellow",
                  JobState.SUPERSEDED: "bright_black", JobState.RUNNING: "cyan"}


def job_lines(views: list[JobView], width: int | None) -> list[str]:
    """Two lines a job (75 columns, then the series and the reason wrapped to ``width``, or unwrapped
    when None). The state is coloured; typer drops colours when the output is not a terminal."""
    lines = [f"{'job':>5}  {'patient':<10}  {'n':>4}  {'state':<10}  {'received':<14}  {'waited':>7}  "
             f"{'ran':>7}  {'sent':>5}"] if views else []
    for v in views:
        uid = v.series_instance_uid
        ran = duration(v.started_at, v.run_end)
        state = typer.style(f"{v.state:<10}", fg=_STATE_COLOURS.get(v.state))
        sent = f"{v.sent}/{v.outputs}" if v.outputs else ""
        waited = duration(v.complete_at, v.started_at)
        lines.append(f"{v.id:>5}  {v.patient:<10}  {v.instances or '':>4}  {state}  "
                     f"{local_time(v.created_at)[5:]:<14}  {waited:>7}  {ran:>7}  {sent:>5}".rstrip())
        detail = f"{short_uid(uid)}  {v.reason or v.message or ''}".rstrip()
        lines += (textwrap.wrap(detail, width, initial_indent=" " * 7, subsequent_indent=" " * 7)
                  if width else [" " * 7 + detail])
    return lines


def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Counts of jobs by state, stored series/instances, pending sends, the prior requests (a missing
    baseline asked of the PACS: asking, waiting to ask again, given up, answered; each one: `dicomnode
    priors list`) and the storage volume's space."""
    from dicomnode.clinical.prior_requests import standing_counts
    from dicomnode.db import opened
    from dicomnode.processing import jobs as lifecycle
    from dicomnode.storage.diskspace import describe, judge, read_space

    settings = node_settings(config)
    with opened(settings.db_path) as db:
        counts = lifecycle.overview(db)
        standing = standing_counts(db.con, settings.send.attempts)
    requests = {name: count for name, count in standing.items() if count}
    states = counts.jobs
    space = read_space(os.statvfs(settings.storage_dir))
    limits = settings.min_free_disk_mb, settings.max_disk_used_pct
    data = {
        "ae_title": settings.ae_title,
        "port": settings.port,
        "storage_dir": str(settings.storage_dir),
        "series": counts.series,
        "instances": counts.instances,
        "jobs": states,
        "outbox": counts.outbox,
        "prior_requests": requests,
        "disk": {"free_bytes": space.free_bytes, "used_pct": round(space.used_pct, 1),
                 "low": judge(space, *limits) is not None},
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    console = Console()
    console.print(f"[bold]{data['ae_title']}[/] port {data['port']}  storage {data['storage_dir']}")
    console.print(f"series {data['series']}  instances {data['instances']}")
    console.print(f"disk: {describe(space, *limits)}", highlight=False)
    console.print("jobs: " + (", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none"))
    console.print("outbox: " + (", ".join(f"{k} {v}" for k, v in sorted(data["outbox"].items())) or "empty"))
    waiting = any(name != "answered" for name in requests)
    console.print("prior requests: " + (", ".join(f"{k} {v}" for k, v in requests.items()) or "none")
                  + (" (each: dicomnode priors list)" if waiting else ""), highlight=False)


def echo(config: ConfigOption = None) -> None:
    """C-ECHO the configured PACS (exit status 1 when it does not answer)."""
    from dicomnode.network.sender import echo as do_echo
    from dicomnode.network.tls import TlsError

    try:
        ok, message = do_echo(settings_from(config))
    except TlsError as exc:  # a certificate, key or CA file that cannot be loaded: say which
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    typer.echo(message)
    raise typer.Exit(0 if ok else 1)


def retry(
    job: Annotated[int, typer.Argument(help="Job id (see `dicomnode jobs`).")], config: ConfigOption = None
) -> None:
    """Re-send a job's outputs to the PACS, or re-queue a job whose processing failed."""
    from dicomnode.db import opened
    from dicomnode.network.sender import retry as do_retry

    settings = node_settings(config)
    with opened(settings.db_path) as db:
        try:
            typer.echo(do_retry(db, job))
        except (LookupError, ValueError) as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(1) from exc
    typer.echo("done by the running `dicomnode serve` (if none runs: at its next start)")


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
    app.command("serve")(serve)
    app.command("jobs")(jobs)
    app.command("status")(status)
    app.command("echo")(echo)
    app.command("retry")(retry)
