"""Tiny stand-in pipelines for node tests (``--pipeline node_pipeline:run``).

Why: the node's tests are about receiving, queueing and sending, not segmentation. ``run`` writes one
Secondary Capture whose SOP Instance UID derives from the series content (as the real pipeline's
outputs do), and appends a line to ``<storage_dir>/pipeline-runs.log`` so tests can count runs.
``measure`` is the real pipeline from the label map on (volumes, SEG, SR, pairing, follow-up SRs)
with a fixed label map in place of the model, for tests of the clinical flow without inference.
``faulty`` stands for a model whose native code crashes or hangs on some inputs (isolation tests).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import select
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import SecondaryCaptureImageStorage as SECONDARY_CAPTURE

from dicomnode.processing.pipeline import JobInput, JobOutput, SeriesRejected, report
from seg.records import ModelInfo
from seg.volume import Volume


def derived_uid(*parts: str) -> str:
    digest = hashlib.sha256("|".join(parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _log_run(settings: object, job: JobInput, what: str) -> None:
    log = Path(settings.storage_dir) / "pipeline-runs.log"  # type: ignore[attr-defined]
    with log.open("a") as fh:
        fh.write(f"{job.job_id} {job.series_instance_uid} {len(job.files)} {what}\n")


def run(job: JobInput, settings: object) -> JobOutput:
    """One deterministic Secondary Capture per series content."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in job.files]
    _log_run(settings, job, "run")
    src = headers[0]
    content = ",".join(sorted(str(h.SOPInstanceUID) for h in headers))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = derived_uid("test-sc", content)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SeriesInstanceUID = derived_uid("test-sc-series", str(src.SeriesInstanceUID))
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber"):
        if kw in src:
            setattr(ds, kw, src.get(kw))
    ds.Modality, ds.ConversionType, ds.SeriesNumber, ds.InstanceNumber = "OT", "WSD", 900, 1
    ds.SeriesDescription = f"node test result for {len(headers)} instances"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.full((8, 8), len(headers) % 256, dtype=np.uint8).tobytes()
    path = job.work_dir / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return JobOutput(outputs=[path], message=f"test pipeline: 1 object from {len(headers)} instances")


def fail(job: JobInput, settings: object) -> JobOutput:
    _log_run(settings, job, "fail")
    raise RuntimeError("test pipeline failure")


def reject(job: JobInput, settings: object) -> JobOutput:
    _log_run(settings, job, "reject")
    raise SeriesRejected("test pipeline says no")


def faulty(job: JobInput, settings: object) -> JobOutput:
    """By SeriesDescription: "crash" segfaults in native code, "exit" calls ``os._exit``, "oom" asks for
    more memory than exists (MemoryError), "hang" blocks forever in a system call; any other series
    runs :func:`run`. Logs its pid first, so a test can check that a killed node leaves no pipeline
    process behind."""
    description = str(pydicom.dcmread(job.files[0], stop_before_pixels=True).get("SeriesDescription", ""))
    for fault in ("crash", "exit", "oom", "hang"):
        if fault in description:
            _log_run(settings, job, f"{fault} pid={os.getpid()}")
            if fault == "crash":
                ctypes.string_at(0)  # SIGSEGV: a null read in C, as a broken native library would do
            if fault == "exit":
                os._exit(7)
            if fault == "oom":
                bytearray(1 << 62)
            select.select([], [], [])  # hang: blocked in the kernel, deaf to anything Python could do
    return run(job, settings)


THRESHOLD_MODEL = ModelInfo(name="node-test-threshold", version="1", demo=True)


def threshold_labels(ct: Volume) -> Volume:
    """The label map without a model: every voxel above -500 HU is vastus lateralis (so a series'
    volume is its slice count × slice area)."""
    from seg.labels import LABEL_OF

    return ct.with_array(np.where(ct.array > -500, LABEL_OF["vastus_lateralis"], 0).astype(np.uint8))


def measure(job: JobInput, settings: object) -> JobOutput:
    """:func:`dicomnode.processing.pipeline.report` on :func:`threshold_labels`."""
    from seg.io import load_dicom_series

    _log_run(settings, job, "measure")
    ct = load_dicom_series(sorted(job.files))
    return report(job, settings, ct, threshold_labels(ct), THRESHOLD_MODEL)  # type: ignore[arg-type]


def _sent(settings: object, path: Path, timeout: float = 30.0) -> bool:
    """Whether the node's sender stored ``path`` in the PACS within ``timeout`` s (read from the index)."""
    import sqlite3
    import time

    db = Path(settings.db_path)  # type: ignore[attr-defined]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            row = con.execute("SELECT state FROM outbox WHERE path=?", (str(path),)).fetchone()
        finally:
            con.close()
        if row is not None and row[0] == "sent":
            return True
        time.sleep(0.05)
    return False


def early(job: JobInput, settings: object) -> JobOutput:
    """:func:`run`'s object handed on early; a second object is written only once the PACS has the first
    (so the first was sent while the job still ran), and both are returned, as the real pipeline does."""
    first = run(job, settings).outputs[0]
    job.output_ready(first)
    seen = _sent(settings, first)
    _log_run(settings, job, f"early sent-while-running={seen}")
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = derived_uid("second", ds.SOPInstanceUID)
    second = job.work_dir / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(second, enforce_file_format=True)
    return JobOutput(outputs=[first, second], message="test pipeline: 2 objects, the first sent early")


def measure_crash_once(job: JobInput, settings: object) -> JobOutput:
    """:func:`measure`, whose first attempt dies (native crash) once its SEG and SR, handed on early, are
    in the PACS: the second attempt must keep them (same UIDs, same content) and send them no second time."""
    output = measure(job, settings)
    runs = (Path(settings.storage_dir) / "pipeline-runs.log").read_text().splitlines()  # type: ignore[attr-defined]
    if sum(line.startswith(f"{job.job_id} ") for line in runs) == 1:
        early = [p for p in output.outputs
                 if pydicom.dcmread(p, stop_before_pixels=True).Modality in ("SEG", "SR")]
        sent = len(early) == 2 and all(_sent(settings, p) for p in early)
        _log_run(settings, job, f"crash after the SEG and SR were sent={sent}")
        ctypes.string_at(0)
    return output
