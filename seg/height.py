"""The one height-plausibility rule: which heights may divide a volume into an index (cm³/m²).

Why one place: the index divides by height², so a wrong height (a PatientSize in cm, a typo in the
registry) silently scales every index. The pipeline, the clinical registry and the measurement all
ask this module, so a height is either used everywhere or nowhere. Heights are never guessed.
"""

from __future__ import annotations

from typing import Any, Literal

PLAUSIBLE_HEIGHT_M = (1.2, 2.2)
PLAUSIBLE_RANGE_TEXT = f"{PLAUSIBLE_HEIGHT_M[0]}–{PLAUSIBLE_HEIGHT_M[1]} m"


def plausible_height(value: float | None) -> bool:
    """True for an adult height in metres this node may use (inclusive range)."""
    return value is not None and PLAUSIBLE_HEIGHT_M[0] <= float(value) <= PLAUSIBLE_HEIGHT_M[1]


def height_from_patient_size(size: Any) -> tuple[float | None, str]:
    """DICOM PatientSize (m) → (height or None, provenance: "PatientSize", "missing" or "implausible …")."""
    try:
        value = float(size) if size not in (None, "") else None
    except (TypeError, ValueError):
        value = None
    if value is None or value <= 0:
        return None, "missing"
    if not plausible_height(value):
        return None, f"implausible PatientSize {value:.2f} m"
    return value, "PatientSize"


HeightState = Literal["present", "missing", "implausible"]


def height_state(height_m: float | None, height_source: str | None, patient_size: Any = None) -> HeightState:
    """Whether a record has a height for its index, and if not why: what its own ``height_source``
    says (the registry or PatientSize decided it once, :func:`dicomnode.clinical.registry.resolve`),
    so the SR, the page and volumes.json agree; the SR and page judged PatientSize again and called an
    implausible registry height "missing". A record stored without a source (an older volumes.json)
    is judged by ``patient_size``."""
    if height_m:
        return "present"
    source = height_source if height_source is not None else height_from_patient_size(patient_size)[1]
    return "implausible" if source.startswith("implausible") else "missing"
