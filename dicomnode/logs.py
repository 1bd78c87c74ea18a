"""Structured logging for the node: one line per event, ``key=value`` or JSON, never PHI above DEBUG.

Why: an administrator greps or ships these logs; they must say what happened to which series/job
without exposing PatientName/PatientID. Callers pass identifiers as fields (``event(log, "stored",
series=uid)``); anything patient-identifying is logged only at DEBUG, and :func:`pseudonym` gives a
stable short token when a patient must be told apart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

_FIELDS = "fields"


_pseudonym_key = b"dicomnode"


def load_pseudonym_key(storage_dir: Path) -> bytes:
    """Use this node's secret key (``storage_dir/.pseudonym-key``, created on first use) for pseudonyms;
    returned for the other keyed derivation, the outputs' tracking UIDs (:mod:`reporting.uids`).

    Why a key: a plain hash of a PatientID can be reversed by hashing every plausible ID; an HMAC with a
    per-node secret cannot, yet stays stable across restarts of the same node.
    """
    global _pseudonym_key
    path = Path(storage_dir) / ".pseudonym-key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)  # a stale one would keep its mode
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # 0600 from its first byte on
        try:
            os.write(fd, os.urandom(32))
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # first writer wins; others read the winner's key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    _pseudonym_key = path.read_bytes()
    return _pseudonym_key


def pseudonym(patient_id: str | None, issuer: str | None = "") -> str:
    """A stable short token for a patient (for tables and logs): HMAC-SHA256 under the node's key."""
    if not patient_id:
        return "-"
    digest = hmac.new(_pseudonym_key, f"{issuer or ''}|{patient_id}".encode(), hashlib.sha256).hexdigest()
    return f"P-{digest[:8]}"


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event; fields become ``key=value`` pairs (or JSON keys)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={_FIELDS: fields})


# characters that would break a log line or be read as one on a terminal or in a log viewer:
# C0 controls (newline, carriage return, ESC, ...), DEL, C1 controls (NEL, ...), line/paragraph separators
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
_IN_QUOTES = re.compile(r'["\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
_SHORT_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


OUR_PACKAGES = frozenset({"dicomnode", "seg", "reporting"})


def error_text(exc: BaseException) -> str:
    """An exception as a log line above DEBUG may show it: type and text where this project wrote the
    text (its own exception classes) or the system did (an OSError: its words and a path under the
    storage folder, named by UIDs), the type alone otherwise, with the text at DEBUG. Why: pydicom,
    highdicom and pydantic quote the value they refuse, and in a header that is a name, an ID or a
    date."""
    name = type(exc).__name__
    if type(exc).__module__.partition(".")[0] in OUR_PACKAGES or isinstance(exc, OSError):
        return f"{name}: {exc}".strip().rstrip(":")
    return f"{name} (its text is logged at DEBUG)"


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT_ESCAPES.get(char) or f"\\u{ord(char):04x}"


def escape_value(text: str) -> str:
    """One ``key=value`` value: bare when unambiguous, else in double quotes with JSON-style escapes.

    Why: values come from received headers and peers; a newline or quote in one must not start a
    forged log line or a forged ``key=value`` pair.
    """
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + _IN_QUOTES.sub(_escape_char, text) + '"'


def escape_text(text: str) -> str:
    """Free text (an event name, a library's message): control characters escaped, nothing else."""
    return _CONTROL.sub(_escape_char, text)


class KeyValueFormatter(logging.Formatter):
    """``2024-01-01T12:00:00Z INFO dicomnode.network.scp stored series=1.2.3 n=4``.

    Each record is one line; only a traceback adds lines, each indented, so every line that starts in
    column 0 is a real record.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = escape_text(record.getMessage())
        parts = [f"{ts}.{int(record.msecs):03d}Z", record.levelname, record.name, message]
        for key, value in getattr(record, _FIELDS, {}).items():
            parts.append(f"{key}={escape_value(str(value))}")
        line = " ".join(parts)
        if record.exc_info:
            line += "".join("\n  " + part for part in self.formatException(record.exc_info).splitlines())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        data.update(
            {
                k: v if isinstance(v, int | float | bool) or v is None else str(v)
                for k, v in getattr(record, _FIELDS, {}).items()
            }
        )
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Configure the root logger once (stderr). pynetdicom stays at WARNING unless DEBUG is asked for,
    because its DEBUG output dumps datasets (PHI) and its INFO lines cost time per instance; pydicom's
    value warnings are DEBUG only (:func:`_quiet_pydicom`)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_dicomnode", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._dicomnode = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
    handler.addFilter(library_info_as_debug)
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    root.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    )
    # highdicom narrates each object it builds at INFO ("copy attributes of module ...": 8 lines an
    # object, most of an INFO log): its warnings and errors only, unless DEBUG is asked for
    quiet = logging.WARNING if root.level > logging.DEBUG else logging.NOTSET
    logging.getLogger("highdicom").setLevel(quiet)
    _quiet_pydicom(root.level > logging.DEBUG)


# pynetdicom's two ERROR lines for a connection that failed (a PACS down, a TLS certificate refused):
# the node retries a send, and fails the job with an ERROR line of its own once it gives up
_CONNECT_FAILED = ("Association request failed: unable to connect to remote", "TCP Initialisation Error")
# pynetdicom's ERROR line when it aborts an association idle for network_timeout, no fields
_IDLE_ABORT = "Network timeout reached"


def library_info_as_debug(record: logging.LogRecord) -> bool:
    """pynetdicom's and highdicom's INFO lines labelled DEBUG (they reach the log only when DEBUG is
    asked for), pynetdicom's connection failures labelled WARNING, and its idle abort of an association
    the node accepted labelled DEBUG and kept only when DEBUG is asked for.

    Why: at DEBUG pynetdicom logs each request's identifier element by element at INFO (a C-FIND's
    ``(0010,0020) LO [MRN-778899]``), so a log shipper that keeps INFO and above kept PHI that the
    node's own lines keep at DEBUG; highdicom narrates every object it builds. A send to a PACS that is
    down gave two pynetdicom ERROR lines per attempt for what the node retries: their text (the
    socket's or TLS's error) stays, as a warning. An idle caller the listener aborts is the node's own
    ``connection dropped reason=network-timeout`` WARNING, with address and AE title
    (:mod:`dicomnode.network.scp`); pynetdicom's line for it said less, as an ERROR. It is logged in the
    association's own thread, which tells an accepted association from one the node requested (a
    send, whose idle abort stays an ERROR)."""
    library = record.name.partition(".")[0]
    if record.levelno == logging.INFO and library in ("pynetdicom", "highdicom"):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    elif (record.levelno == logging.ERROR and library == "pynetdicom"
          and str(record.msg).startswith(_CONNECT_FAILED)):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    elif (record.levelno == logging.ERROR and library == "pynetdicom" and record.msg == _IDLE_ABORT
          and getattr(threading.current_thread(), "is_acceptor", False) is True):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)
    return True


PYDICOM_MODULES = r"pydicom(\.|$)"


def _quiet_pydicom(quiet: bool) -> None:
    """Keep pydicom's warnings out of the log unless DEBUG is asked for.

    Why: they quote the value they complain about ("Invalid value for VR UI: '…'"), both to the
    ``pydicom`` logger and through :mod:`warnings` to stderr, and in a mis-framed data set (a length
    field that is off) that value holds the elements after it: the patient's name, ID and dates.
    """
    logging.getLogger("pydicom").setLevel(logging.ERROR if quiet else logging.NOTSET)
    if quiet:
        warnings.filterwarnings("ignore", category=UserWarning, module=PYDICOM_MODULES)
    else:
        ours = [f for f in warnings.filters if getattr(f[3], "pattern", "") == PYDICOM_MODULES]
        for entry in ours:
            warnings.filters.remove(entry)
