"""The source CT's Specific Character Set, in a form every output can declare.

Why: the outputs copy the CT's patient and study text (names, descriptions) and highdicom (0.28.2)
builds them only under the character sets it knows, in the combinations it allows. It refuses:

- an empty first value, ``\\ISO 2022 IR 87`` (PS3.3 C.12.1.1.2: value 1 empty means the default
  repertoire; the usual Japanese and Korean form), although ``ISO 2022 IR 6\\ISO 2022 IR 87`` means
  the same and is accepted;
- Korean, ``ISO 2022 IR 149``, in any form: its enum spells Korean "ISO 2022 IR 159" (the Japanese
  supplementary kanji), so the Korean term is unknown to it (docs/upstream.md);
- a single code-extension term (some scanners write ``ISO 2022 IR 100`` alone) and undefined terms.

Every output of such a study failed to build. An empty first value and a single single-byte
code-extension term keep their bytes under the equivalent declaration (``ISO 2022 IR 6\\...``,
``ISO_IR 100``); the others are decoded under the source's character set and declared UTF-8
(``ISO_IR 192``): the same characters in another encoding (dicom3tools' dcentvfy, which compares
bytes, then reports the patient's name as different).
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset

UTF8 = "ISO_IR 192"
DEFAULT_EXTENDED = "ISO 2022 IR 6"
_KNOWN = frozenset(v.value for v in hd.SpecificCharacterSetValues)
_EXTENDED = frozenset(v for v in _KNOWN if v.startswith("ISO 2022 "))
_PLAIN = _KNOWN - _EXTENDED
_MULTI_BYTE = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58"})


def declarable(values: list[str]) -> bool:
    """Would highdicom take these Specific Character Set values as they are?"""
    if len(values) == 1:
        return values[0] in _PLAIN
    return values[0] not in _MULTI_BYTE and all(v in _EXTENDED for v in values)


def with_declarable_charset(ds: Dataset) -> Dataset:
    """``ds`` (in place) with a Specific Character Set that highdicom accepts; see the module's note."""
    cs = ds.get("SpecificCharacterSet")
    if not cs:
        return ds
    values = [str(cs)] if isinstance(cs, str) else [str(v) for v in cs]
    if len(values) > 1 and not values[0]:
        values[0] = DEFAULT_EXTENDED
    elif len(values) == 1 and values[0] in _EXTENDED and values[0] not in _MULTI_BYTE:
        # one single-byte code-extension term alone: nothing to switch to, so its plain term's bytes
        values = [] if values[0] == DEFAULT_EXTENDED else ["ISO_IR " + values[0].rsplit(" ", 1)[1]]
        if not values:
            del ds.SpecificCharacterSet
            return ds
    if declarable(values):
        if values != ([str(cs)] if isinstance(cs, str) else list(cs)):
            ds.SpecificCharacterSet = values
        return ds
    ds.decode()  # every text element to str under the source's character set, before it changes
    ds.SpecificCharacterSet = UTF8
    return ds
