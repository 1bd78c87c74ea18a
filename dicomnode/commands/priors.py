"""``dicomnode priors``: the baselines the node asked the PACS for, where each request stands, and
asking again.

Why: a follow-up without its baseline measures no loss. The node asks the PACS for the baseline and
asks again while the PACS cannot be asked (``send.attempts``); once those are spent, or once the PACS's
side is mended (its entry for the node, a firewall), an administrator needs to see which requests
stand where and why, and to ask again without waiting for another follow-up.
"""

from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING, Annotated

import typer

from dicomnode.commands.common import ConfigOption, node_settings
from seg.terminal import COLUMNS

if TYPE_CHECKING:
    from dicomnode.clinical.prior_requests import PriorRequest, RequestView
    from dicomnode.config import Settings

priors_app = typer.Typer(help="Baselines asked of the PACS: where each request stands, asking again.",
                         no_args_is_help=True)

# What came of asking again, as `priors retry` and `patients link` print it
_ASKED_AGAIN = {"retrieved": "baseline moved to the node (measured and paired as it arrives)",
                "none": "the PACS holds no earlier CT",
                "failed": "the PACS could not be asked (the node asks again: dicomnode priors list)"}


def ask_again(settings: Settings, requests: list[PriorRequest], why: str, what: str) -> None:
    """Ask the PACS anew for each of ``requests`` (``why``: the index's note), printing ``what`` is
    asked and then how many came out which way. One after the other, each up to the network
    timeout where the PACS hangs: with several, stderr names the one being asked."""
    from collections import Counter

    from dicomnode.clinical.prior_requests import ask_anew
    from dicomnode.timefmt import short_uid

    typer.echo(f"asking the PACS again for {what}")
    outcomes: Counter[str] = Counter()
    for n, request in enumerate(requests, 1):
        if len(requests) > 1:
            typer.echo(f"  asking {n} of {len(requests)}: follow-up {short_uid(request.study_instance_uid)}",
                       err=True)
        outcomes[str(ask_anew(settings, request, why))] += 1
    for status, count in outcomes.items():
        typer.echo(f"  {count}: {_ASKED_AGAIN[status]}")


def _lines(views: list[RequestView], attempts: int) -> list[str]:
    """Two lines or more a request, within 80 columns: patient, follow-up study, standing, failed
    attempts, time of the newest row; below, what the PACS answered or why it could not be asked."""
    from dicomnode.timefmt import short_uid

    lines = [f"{'patient':<10}  {'follow-up':<15}  {'standing':<20}  {'failed':>6}  {'last (UTC)':<16}"]
    for v in views:
        s = v.state
        failed = f"{s.failed}/{attempts}" if s.failed else ""
        lines.append(f"{v.patient:<10}  {short_uid(s.study_instance_uid):<15}  {v.standing:<20}  "
                     f"{failed:>6}  {s.at:%Y-%m-%d %H:%M}")
        lines += textwrap.wrap(s.detail or "", COLUMNS, initial_indent=" " * 4, subsequent_indent=" " * 4)
    return lines


@priors_app.command("list")
def list_(
    config: ConfigOption = None,
    every: Annotated[bool, typer.Option("--all", help="Answered requests too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The follow-ups whose baseline the node asked the PACS for and has not got (--all: every one),
    oldest first: the patient's pseudonym (as `dicomnode jobs` shows it), the follow-up study, where
    the request stands (asking, waiting to ask again, given up, answered), its failed attempts, and
    what the PACS answered or why it could not be asked."""
    from dicomnode.clinical.prior_requests import request_views
    from dicomnode.db import opened

    settings = node_settings(config)
    attempts = settings.send.attempts
    with opened(settings.db_path) as db:
        views = request_views(db.con, attempts, answered=every)
    if as_json:
        typer.echo(json.dumps([
            {"patient": v.patient, "study_instance_uid": v.state.study_instance_uid}
            | v.state.as_json(attempts) | {"attempts": attempts} for v in views], indent=2))
        return
    if not views:
        typer.echo("no prior requests" + ("" if every else " waiting for an answer (--all: answered too)"))
        return
    for line in _lines(views, attempts):
        typer.echo(line)


@priors_app.command("retry")
def retry(config: ConfigOption = None) -> None:
    """Ask the PACS again, now, for every baseline the node has given up on or is waiting to ask for
    again, each with its attempts counted from one, and print what came of it. For after the PACS's
    side was mended (its entry for the node, a firewall): the reasons `dicomnode priors list` shows
    say what to mend. A follow-up that has its baseline since is left alone."""
    from dicomnode.clinical import pairing

    settings = node_settings(config)
    if not settings.pairing.retrieve_priors:
        typer.echo("prior retrieval is switched off (pairing.retrieve_priors): nothing asked", err=True)
        raise typer.Exit(2)
    attempts = settings.send.attempts
    waiting = ("waiting to ask again", "given up")
    requests = pairing.still_wanted(settings, lambda s: s.standing(attempts) in waiting)
    if not requests:
        typer.echo("no prior request is waiting to be asked again or given up")
        return
    ask_again(settings, requests, "asked again by an operator (dicomnode priors retry)",
              f"{len(requests)} follow-up(s) without a baseline")


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the main app."""
    app.add_typer(priors_app, name="priors")
