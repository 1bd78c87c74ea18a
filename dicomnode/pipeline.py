"""One job, start to finish: series files in, DICOM outputs (to send) and measurements out.

The worker calls :func:`run_pipeline`; everything it needs from ``seg`` and ``reporting`` is called
from here and nowhere else, so the queue engine can change without touching the science.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.config import Settings


class SeriesRejected(Exception):
    """The series is not something this node measures; the message says why (shown to users)."""


@dataclass
class JobInput:
    job_id: int
    series_instance_uid: str
    files: list[Path]  # every stored instance of the series
    work_dir: Path  # private folder for this job's intermediate and output files


@dataclass
class JobOutput:
    outputs: list[Path] = field(default_factory=list)  # DICOM files to send to the PACS
    volumes_json: Path | None = None
    message: str = ""


def run_pipeline(job: JobInput, settings: Settings) -> JobOutput:
    """Placeholder until segmentation and reporting land: never reports success."""
    raise NotImplementedError("processing pipeline not installed yet (placeholder)")
