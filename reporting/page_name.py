"""The patient's name as a page drawn with matplotlib can show it, in any script.

Why: a DICOM PN has up to three component groups, alphabetic, ideographic and phonetic (PS3.5
6.2.1; Korean "Hong^Gildong=洪^吉洞=홍^길동"), and a Korean or Japanese site may fill only the latter
two, or write Hangul in the first. matplotlib's default font (DejaVu Sans) has no Hangul or CJK
glyphs: such a name was drawn as empty boxes, with a "Glyph ... missing" warning per character.
The page now shows the first group that a font matplotlib knows can draw (the page's own first;
no CJK font is assumed to be installed), and says the name is not shown rather than drawing boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pydicom.valuerep import PersonName

NOT_SHOWN = "not shown, see PACS"  # no font here has the name's glyphs
MAX_CHARS = 40  # the header line has room for this much name beside the ID, sex, age and accession
_BOX_FONTS = ("Last Resort",)  # fonts that "have" every character as a box (matplotlib ships one)


@dataclass(frozen=True)
class PageName:
    """The name's text for the page, and the font family that has glyphs the page's font lacks
    (None: the page's font draws it all)."""

    text: str
    fallback_font: str | None = None

    def families(self) -> list[str] | None:
        """The font families to draw the name's line with (None: the page's default)."""
        if self.fallback_font is None:
            return None
        import matplotlib

        return [*matplotlib.rcParams["font.family"], self.fallback_font]


def page_name(value: str | None) -> PageName | None:
    """The text a page shows for the PN ``value`` (None when it has no name at all): the first of the
    alphabetic, ideographic and phonetic groups, as "Family, Given", that a font can draw, else
    :data:`NOT_SHOWN`."""
    groups = [g for g in (_formatted(c) for c in PersonName(value or "").components) if g]
    if not groups:
        return None
    for text in groups:
        missing = frozenset(c for c in text if not _drawable(c, _page_font()))
        if not missing:
            return PageName(text)
        if (font := _font_with(missing)) is not None:
            return PageName(text, font)
    return PageName(NOT_SHOWN)


def _formatted(group: str) -> str:
    """One component group as "Family, Given" (the family or given name alone when the other is
    empty), cut to :data:`MAX_CHARS`."""
    family, given = ([*group.split("^"), ""][:2])
    return ", ".join(p.strip() for p in (family, given) if p.strip())[:MAX_CHARS]


def _drawable(text: str, font_path: str) -> bool:
    """Has the font at ``font_path`` a glyph for every character of ``text``?"""
    from matplotlib import font_manager

    font = font_manager.get_font(font_path)
    return all(font.get_char_index(ord(c)) for c in text)


def _page_font() -> str:
    """The file of the font the page's text is drawn with (matplotlib's default; findfont caches)."""
    from matplotlib import font_manager

    return str(font_manager.findfont(font_manager.FontProperties()))


@lru_cache(maxsize=64)
def _font_with(chars: frozenset[str]) -> str | None:
    """The family of a font matplotlib knows that has every one of ``chars``, or None; upright
    regular fonts first, as the page draws the name (matplotlib then picks that one of the family)."""
    from matplotlib import font_manager

    def weight(w: int | str) -> int:
        return w if isinstance(w, int) else font_manager.weight_dict.get(w, 400)

    text = "".join(sorted(chars))
    fonts = sorted((f for f in font_manager.fontManager.ttflist if not f.name.startswith(_BOX_FONTS)),
                   key=lambda f: (f.style != "normal", abs(weight(f.weight) - 400), f.name, f.fname))
    return next((f.name for f in fonts if _drawable(text, f.fname)), None)
