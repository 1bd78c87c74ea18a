"""Deterministic UIDs for phantoms: same seed and options, same UIDs (2.25 + UUID5 integer)."""

from __future__ import annotations

import uuid

_NAMESPACE = uuid.UUID("7a1c2f4e-5b0d-4d8e-9a51-3c6f0e2b9d11")


def derived_uid(*parts: str) -> str:
    """A DICOM UID derived from text parts (the 2.25 root takes a UUID as a decimal integer)."""
    return "2.25." + str(uuid.uuid5(_NAMESPACE, "/".join(parts)).int)
