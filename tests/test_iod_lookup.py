"""highdicom's IOD lookups remembered (:mod:`reporting.iod_lookup`): the same answers as highdicom's own,
and highdicom's multi-frame check still asks through the lookup that is remembered (a guard on its
private module: a highdicom that changes this fails here, not silently slower)."""

from __future__ import annotations

import inspect

from highdicom import _standard_utils as tables

import reporting.seg  # noqa: F401 - installs the lookup, as the node does
from reporting import iod_lookup

CT, SEG, SR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def test_the_remembered_lookup_gives_highdicom_answers() -> None:
    installed = tables.is_attribute_in_iod
    original = installed.remembers
    assert iod_lookup.install() and tables.is_attribute_in_iod is installed  # once only
    keywords = ("NumberOfFrames", "PixelData", "ContentDate", "SegmentSequence")
    questions = [(kw, uid, exclude) for kw in keywords for uid in (CT, ENHANCED_CT, SEG, SR)
                 for exclude in (None, ["IconImageSequence"])]
    for kw, uid, exclude in questions * 2:  # computed, then remembered
        assert installed(kw, uid, exclude) == original(kw, uid, exclude), (kw, uid, exclude)
    assert not installed("NumberOfFrames", CT) and installed("NumberOfFrames", ENHANCED_CT)
    for _ in range(2):
        try:
            installed("NumberOfFrames", "1.2.3.4")
        except KeyError as exc:  # an unknown SOP class: highdicom's error, every time
            assert "1.2.3.4" in str(exc)
        else:
            raise AssertionError("no KeyError for an unknown SOP class")


def test_highdicom_multiframe_check_asks_the_remembered_lookup() -> None:
    import highdicom.image

    assert highdicom.image.is_multiframe_image is tables.is_multiframe_image  # what a SEG's build calls
    assert "is_attribute_in_iod(" in inspect.getsource(tables.is_multiframe_image)  # found in the module
