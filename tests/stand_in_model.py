"""A model stand-in for tests of what the node and the CLI do with labels, not of the network.

``seg.infer.segment`` is replaced by a given label function. The shipped package is still loaded,
verified and reported (its name and version reach the SR and summaries), but once per test process
and without preparing a runtime for it: the network never runs, so compiling it again for every
``segment`` run (about 2-5 s each) only cost time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from seg.model import load_model as real_load_model
from seg.volume import Volume


@functools.cache
def _shipped_package() -> Any:
    return real_load_model(None, device="cpu")


def use_label_function(monkeypatch: pytest.MonkeyPatch, labels_of: Callable[[Volume], Volume]) -> None:
    """Make ``segment`` return ``labels_of(ct)``; the shipped package is loaded once, a site's
    package (a path) as before. The node's own model cache starts empty and is put back afterwards,
    so no unprepared package outlives the test."""
    def load_model(path: Path | str | None = None, device: str = "auto") -> Any:
        return _shipped_package() if path is None else real_load_model(path, device=device)

    def segment(ct: Volume, model: object, progress: bool = False, precision: str | None = None) -> Volume:
        return ct.with_array(np.asarray(labels_of(ct).array, dtype=np.uint8))

    monkeypatch.setattr("seg.model.load_model", load_model)
    monkeypatch.setattr("seg.runtime.prepare", lambda pkg, *_: pkg)
    monkeypatch.setattr("seg.infer.segment", segment)
    monkeypatch.setattr("dicomnode.processing.pipeline._model_cache", {})
