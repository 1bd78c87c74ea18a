"""Series UIDs as the job table and the operations page show them (dicomnode.timefmt.short_uid)."""

from __future__ import annotations

from dicomnode.timefmt import short_uid


def test_a_long_uid_keeps_its_last_14_characters_after_an_ellipsis() -> None:
    uid = "1.2.826.0.1.3680043.8.498.1234567890"
    assert short_uid(uid) == "…" + uid[-14:] and len(short_uid(uid)) == 15


def test_a_uid_of_15_characters_or_fewer_is_shown_whole() -> None:
    assert short_uid("1.2.3.4.5.6.7.8") == "1.2.3.4.5.6.7.8"  # 15
    assert short_uid("1.2.3.4.5.6.7.89") == "…2.3.4.5.6.7.89"  # 16: shortened (the page kept 16 whole)
    assert short_uid("") == ""
