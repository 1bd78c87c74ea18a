"""A TOML writer for the node's configuration files (``tomllib`` reads only; no extra dependency).

Covers what a node configuration holds: strings, numbers, booleans, lists of those, and one level of
tables. Strings are escaped, so paths with backslashes or quotes round-trip through ``tomllib``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        return _value(value.as_posix())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def toml_text(data: dict[str, Any]) -> str:
    """``data`` as TOML text: top-level keys first, then one ``[table]`` per dict value."""
    lines = [f"{k} = {_value(v)}" for k, v in data.items() if v is not None and not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_value(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines) + "\n"


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    Path(path).write_text(toml_text(data))
    return Path(path)
