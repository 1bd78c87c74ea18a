"""Small synthetic CT series for node tests: now :mod:`dicomnode.harness.series` (benchmarks use it)."""

from dicomnode.harness.series import (
    CT_IMAGE,
    ENHANCED_CT_IMAGE,
    MR_IMAGE,
    SeriesFiles,
    uid,
    write_big_series,
    write_ct_series,
    write_enhanced_ct,
)

__all__ = ["CT_IMAGE", "ENHANCED_CT_IMAGE", "MR_IMAGE", "SeriesFiles", "uid", "write_big_series",
           "write_ct_series", "write_enhanced_ct"]
