"""What an ingest run reports: progress events while it runs, and its summary.

:class:`IngestReport` is what :func:`voxlake.ingest.ingest` returns and what its row in
the ``runs`` table records (with the run's configuration, secrets left out, and the
versions of the packages that shaped its output).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from voxlake.config import IngestConfig

__all__ = [
    "IngestReport",
    "ProgressEvent",
    "ProgressHandler",
    "config_json",
    "new_run_id",
    "versions_json",
]

_VERSIONED_PACKAGES = (
    "voxlake", "pydicom", "zarr", "deltalake", "dask", "numpy", "pylibjpeg",
    "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "python-gdcm",
)  # fmt: skip


@dataclass(frozen=True)
class ProgressEvent:
    """Progress of one stage: "cluster" (``message`` is the dashboard link), "files",
    "headers" or "volumes"."""

    stage: str
    done: int
    total: int | None
    bytes: int = 0
    message: str | None = None


class ProgressHandler(Protocol):
    """Receives :class:`ProgressEvent` s (the CLI draws a progress bar from them)."""

    def __call__(self, event: ProgressEvent) -> None: ...


@dataclass
class IngestReport:
    """What one ingest run did (also stored as its row in the ``runs`` table)."""

    run_id: str
    catalog_url: str
    store_url: str
    status: str = "running"
    catalog_version: int = 0
    files_seen: int = 0
    files_skipped: int = 0
    instances: int = 0
    volumes_written: int = 0
    volumes_skipped: int = 0
    #: Volume rows deleted because a file they were built from changed or was pruned.
    volumes_retired: int = 0
    #: Catalogued files under the sources that the listing did not find (rows kept).
    files_missing: int = 0
    #: Rows of missing files deleted (``prune``).
    files_pruned: int = 0
    #: Sources that listed no file at all (an empty folder, a share not mounted).
    empty_sources: list[str] = field(default_factory=list)
    failures: int = 0
    failures_by_code: dict[str, int] = field(default_factory=dict)
    #: Warning code (``docs/reliability.md``) to the number of files and volumes of this
    #: run that carry it (in ``instances.warnings`` and ``volumes.warnings``).
    warnings_by_code: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    duration_s: float = 0.0
    dashboard_link: str | None = None
    headers_only: bool = False

    @property
    def mb_per_s(self) -> float:
        """Source megabytes read per second of wall-clock time."""
        return self.bytes_read / 1e6 / self.duration_s if self.duration_s else 0.0

    @property
    def files_per_s(self) -> float:
        """Files read per second of wall-clock time."""
        read = self.files_seen - self.files_skipped
        return read / self.duration_s if self.duration_s else 0.0


def new_run_id() -> str:
    """A time-ordered, unique run id."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def config_json(config: IngestConfig) -> str:
    """The run's configuration as the ``runs`` table stores it: the secret and the
    storage options (which may hold credentials) left out."""
    data = dataclasses.asdict(config)
    data.pop("secret", None)
    data.pop("storage_options", None)  # may hold credentials
    return json.dumps(data, sort_keys=True, default=str)


def versions_json() -> str:
    """Versions of the installed packages that shape what a run writes, as JSON."""
    from importlib import metadata

    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return json.dumps(versions, sort_keys=True)
