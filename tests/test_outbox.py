"""The send outbox (dicomnode.processing.outbox): its states are the index's strings, and it is the one
writer of outbox rows."""

from __future__ import annotations

import re
from pathlib import Path

import dicomnode
from dicomnode.db import Database
from dicomnode.processing import jobs, outbox
from dicomnode.processing.outbox import OutboxState

T0 = 1_000_000.0


def states(db: Database) -> dict[str, tuple[str, int, str | None]]:
    return {str(r["path"]): (str(r["state"]), int(r["attempts"]), r["last_error"])
            for r in db.query("SELECT path, state, attempts, last_error FROM outbox")}


def test_the_states_are_the_strings_the_index_stores(db: Database) -> None:
    """Older indexes hold these strings: the enum names them, it does not change them."""
    assert [s.value for s in OutboxState] == ["pending", "sent", "failed"]
    default = next(r["dflt_value"] for r in db.query("PRAGMA table_info(outbox)") if r["name"] == "state")
    assert default == f"'{OutboxState.PENDING.value}'"


def test_only_the_outbox_module_writes_outbox_rows() -> None:
    """One owner, as jobs.move is for a job's state: no other module of the node spells a write."""
    write = re.compile(r"(INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE|DELETE\s+FROM)\s+outbox\b", re.IGNORECASE)
    package = Path(dicomnode.__file__).parent
    writers = {p.relative_to(package).as_posix() for p in package.rglob("*.py")
               if write.search(p.read_text())}
    assert writers == {"processing/outbox.py"}


def test_a_row_from_owed_to_sent_failed_and_owed_again(db: Database) -> None:
    with db.tx() as con:
        job_id = jobs.create(con, "1.2.3", T0)
        outbox.add(con, job_id, Path("seg"), T0)
        outbox.add(con, job_id, Path("sr"), T0)
        outbox.add(con, job_id, Path("seg"), T0 + 1)  # handed on again: still one row
    rows = {str(r["path"]): int(r["id"]) for r in db.query("SELECT id, path FROM outbox")}
    assert states(db) == {"seg": ("pending", 0, None), "sr": ("pending", 0, None)}
    with db.tx() as con:
        outbox.mark_sent(con, rows["seg"], job_id, "seg", 1, T0 + 2)
        outbox.retry_later(con, rows["sr"], 1, "refused", T0 + 10)
        assert outbox.counts(con, job_id) == {OutboxState.SENT: 1, OutboxState.PENDING: 1}
        outbox.mark_failed(con, rows["sr"], 2, "refused")
    assert states(db) == {"seg": ("sent", 1, None), "sr": ("failed", 2, "refused")}
    with db.tx() as con:
        outbox.reset_failed(con, job_id)  # a new attempt: only what gave up is owed again
    assert states(db) == {"seg": ("sent", 1, None), "sr": ("pending", 0, None)}
    with db.tx() as con:
        outbox.resend(con, job_id, T0 + 20)  # the operator's re-send: everything
    assert states(db) == {"seg": ("pending", 0, None), "sr": ("pending", 0, None)}
    with db.tx() as con:
        outbox.mark_sent(con, rows["seg"], job_id, "seg", 1, T0 + 21)
        outbox.drop_unsent(con, job_id)
    assert states(db) == {"seg": ("sent", 1, None)}


def test_a_row_dropped_while_it_was_sent_is_recorded_as_sent(db: Database) -> None:
    with db.tx() as con:
        job_id = jobs.create(con, "1.2.3", T0)
        outbox.add(con, job_id, Path("seg"), T0)
    row_id = int(db.query("SELECT id FROM outbox")[0]["id"])
    with db.tx() as con:
        outbox.drop_unsent(con, job_id)  # its job failed meanwhile
        outbox.mark_sent(con, row_id, job_id, "seg", 1, T0 + 1)
    assert states(db) == {"seg": ("sent", 1, None)}
