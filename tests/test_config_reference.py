"""docs/pacs-admin.md §12 lists every setting once, with its default: the table is held to the model in
dicomnode/config.py, so a key added, renamed or given another default fails here until the
administrator's guide says so (an audit found keys documented nowhere)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from dicomnode.config import Settings, _section_of

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "pacs-admin.md"
ROW = re.compile(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", re.M)


def _default(field: FieldInfo) -> Any:
    return field.get_default(call_default_factory=True)


def as_written(value: Any) -> str:
    """A default as the table writes it: TOML's spelling, ``unset`` for no value."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, dict)):
        return "[]" if isinstance(value, list) else "{}"
    return f'"{value}"'  # a text or a path


def model_defaults() -> dict[str, str]:
    """``section.key`` (or ``key``) → its default as written, for every setting of the model."""
    out = {}
    for key, field in Settings.model_fields.items():
        section = _section_of(Settings, key)
        if section is None:
            out[key] = as_written(_default(field))
        else:
            out.update({f"{key}.{k}": as_written(_default(f)) for k, f in section.model_fields.items()})
    return out


def guide_rows() -> list[tuple[str, str]]:
    text = GUIDE.read_text()
    return ROW.findall(text.split("\n## 12. Every setting\n", 1)[1])


def test_every_setting_is_in_the_guide_once_with_its_default() -> None:
    rows = guide_rows()
    twice = [key for key, n in Counter(key for key, _ in rows).items() if n > 1]
    assert not twice, f"listed more than once: {twice}"
    documented, model = dict(rows), model_defaults()
    assert sorted(model.keys() - documented.keys()) == [], "settings missing from docs/pacs-admin.md §12"
    assert sorted(documented.keys() - model.keys()) == [], "rows for keys the model does not have"
    assert {k: v for k, v in documented.items() if model[k] != v} == {}, "defaults the guide states wrongly"


def test_the_defaults_are_written_as_toml_writes_them() -> None:
    assert [as_written(v) for v in (None, True, 10.0, 11112, [], {}, "auto", Path("var"))] == [
        "unset", "true", "10", "11112", "[]", "{}", '"auto"', '"var"']
