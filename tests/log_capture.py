"""What the node logs at INFO, captured for tests that check log content (PHI, event names)."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

from dicomnode.logs import KeyValueFormatter


@contextlib.contextmanager
def captured_info_log(root_level: int = logging.INFO) -> Iterator[io.StringIO]:
    """The root logger's INFO lines, in the node's key=value format, while the block runs.

    ``root_level=logging.DEBUG`` lets DEBUG records reach the root logger too, so a test can show
    that what is logged at DEBUG (where pseudonymised identifiers may be explained) stays out of
    the INFO stream."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(KeyValueFormatter())
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(root_level)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
