"""Receive without the network: what the SCP does with each instance, for in-process tests.

Why: tests of the store, the watcher and retention need instances indexed exactly as the SCP indexes
them (the store's checks, the file meta it writes, the data set bytes as they came over the wire),
without an association; three test modules each had a copy of these four lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicomnode.harness.series import dataset_bytes


def store_files(store: Any, files: list[Path], calling_aet: str = "TEST") -> list[int]:
    """Add each Part 10 file to ``store`` (a :class:`dicomnode.storage.store.Store`); each one's job id."""
    import pydicom

    from dicomnode.storage.store import encode_file_meta, info_from_dataset

    jobs = []
    for f in files:
        ds = pydicom.dcmread(f)
        info = info_from_dataset(ds, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), calling_aet)
        jobs.append(store.add(info, encode_file_meta(info), dataset_bytes(f)).job_id)
    return jobs
