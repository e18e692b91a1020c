"""Ingest: crawl sources, parse and de-identify headers, assemble series, write volumes."""

from __future__ import annotations

from voxlake.ingest.pipeline import ingest
from voxlake.ingest.report import IngestReport, ProgressEvent, ProgressHandler
from voxlake.ingest.series import SliceRef, VolumePlan, plan_volumes
from voxlake.ingest.sources import FileRef, iter_file_batches, list_source

__all__ = [
    "FileRef",
    "IngestReport",
    "ProgressEvent",
    "ProgressHandler",
    "SliceRef",
    "VolumePlan",
    "ingest",
    "iter_file_batches",
    "list_source",
    "plan_volumes",
]
