"""Headless Chromium (Debian's, driven by Playwright) for the tests that open our web pages: the ops
page, the cohort report, OHIF. One launcher, so each test module opens the browser the same way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from dicomnode.harness.viewer import CHROMIUM_ARGS, chromium_path

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - scripts/setup.sh installs it
    sync_playwright = None  # type: ignore[assignment]

HAVE_BROWSER = chromium_path() is not None and sync_playwright is not None
requires_chromium = pytest.mark.skipif(not HAVE_BROWSER,
                                       reason="Chromium and Playwright for Python not installed")


@contextmanager
def launched() -> Iterator[Any]:
    """A headless Chromium (software WebGL, for OHIF's viewports), closed afterwards."""
    if not HAVE_BROWSER:
        pytest.skip("Chromium and Playwright for Python not installed")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=chromium_path(), headless=True,
                                      args=list(CHROMIUM_ARGS))
        try:
            yield chromium
        finally:
            chromium.close()
