"""One ingest run's state on the driver: its report, catalog writer and commits.

The two stages (:mod:`voxlake.ingest._header_stage`, :mod:`voxlake.ingest._volume_stage`)
extend :class:`RunState`; :mod:`voxlake.ingest.pipeline` combines them.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from voxlake.catalog.concurrent import ForeignRows
from voxlake.catalog.keymap import KeyMapWriter
from voxlake.catalog.tables import CatalogWriter
from voxlake.config import IngestConfig
from voxlake.ingest.report import (
    IngestReport,
    ProgressHandler,
    config_json,
    new_run_id,
    versions_json,
)
from voxlake.ingest.sources import recorded_source

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    import pandas as pd

    from voxlake.ingest.readers.native import PixelSpan


#: Failure codes of the infrastructure, not of the data (a store or source that was down,
#: a permission since fixed, an unexpected error): a re-run tries those files and volumes
#: again instead of skipping them as known failures.
RETRYABLE_CODES = frozenset(
    {"store", "unreadable", "permission_denied", "source_unreachable", "source_unavailable",
     "volume_error"}
)  # fmt: skip

#: Built volumes are committed at most every first, at least every second many seconds
#: (and every tenth of the run's volumes, at most 32, once the first has passed): each
#: commit is a few Delta versions and some driver time, yet a driver killed between two
#: commits loses the volumes built since (the re-run builds them again).
VOLUME_COMMIT_SECONDS = (2.0, 10.0)

#: Attempts to append a batch of new instance rows while other runs keep committing to
#: ``instances`` between this run's check and its append (see ``_append_new``).
APPEND_ATTEMPTS = 50


def sql_list(values: Sequence[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


class RunState:
    """State of one run on the driver, shared by its stages."""

    foreign: ForeignRows  # instance rows other runs commit, from the header stage's snapshot

    def __init__(
        self,
        sources: Sequence[str],
        *,
        catalog: str,
        store: str,
        config: IngestConfig,
        catalog_storage_options: dict[str, Any] | None,
        store_storage_options: dict[str, Any] | None,
        progress: ProgressHandler | None,
    ) -> None:
        self.sources = list(sources)
        self.config = config
        self.secret = config.require_secret()
        self.catalog_url = catalog
        self.store_url = store
        self.catalog_options = catalog_storage_options
        self.store_options = store_storage_options
        self.progress = progress or (lambda event: None)
        self.run_id = new_run_id()
        self.started = dt.datetime.now(dt.UTC)
        self.clock = time.perf_counter()
        self.report = IngestReport(self.run_id, catalog, store, headers_only=config.headers_only)
        self.codes: Counter[str] = Counter()
        self.warning_codes: Counter[str] = Counter()
        # Catalog URL -> real address, for sources whose address must not be stored
        # (PACS locators hold original UIDs). In memory only, for this run.
        self.locators: dict[str, str] = {}
        # Catalog URL -> the worker keeping its bytes (PACS instances retrieved once).
        self.kept: dict[str, str] = {}
        # Checked before anything is written: the key map never goes under catalog or store.
        self.key_map = (
            KeyMapWriter(config.key_map_url, catalog_url=catalog, store_url=store or None)
            if config.key_map_url
            else None
        )
        self.writer = CatalogWriter(catalog, storage_options=catalog_storage_options)
        # Catalog URL -> where its native pixel values lie, from this run's header pass:
        # volume tasks read those slices with one ranged read instead of parsing the file.
        self.pixel_spans: dict[str, PixelSpan] = {}
        # (subject_kind, subject) of series and volumes with failure rows: see _note_failed.
        self.failed: set[tuple[str, str]] = set()
        self.foreign_failures: ForeignRows | None = None  # set by plan_and_submit
        # Archives this run's listing found cut or damaged: their series are refused.
        self.damaged_archives: set[str] = set()
        # (volume_id, revision) of committed volumes built from files since replaced,
        # whose rebuild this run submitted: retired if the rebuild fails (set by
        # plan_and_submit).
        self.stale: dict[str, str] = {}
        # Catalogued URLs under this run's sources that its listing did not find.
        self.missing: list[str] = []

    def run_row(self, status: str, message: str | None = None) -> dict[str, Any]:
        r = self.report
        return {
            "run_id": self.run_id,
            "status": status,
            "started_at": self.started,
            "finished_at": None if status == "running" else dt.datetime.now(dt.UTC),
            "sources": [recorded_source(source) for source in self.sources],
            "config_json": config_json(self.config),
            "versions_json": versions_json(),
            "files_seen": r.files_seen,
            "files_skipped": r.files_skipped,
            "instances": r.instances,
            "volumes_written": r.volumes_written,
            "volumes_skipped": r.volumes_skipped,
            "volumes_retired": r.volumes_retired,
            "files_missing": r.files_missing,
            "files_pruned": r.files_pruned,
            "failures": r.failures,
            "failures_by_code": json.dumps(dict(self.codes), sort_keys=True),
            "warnings_by_code": json.dumps(dict(self.warning_codes), sort_keys=True),
            "bytes_read": r.bytes_read,
            "duration_s": time.perf_counter() - self.clock,
            "message": message,
        }

    def commit(self, changes: dict[str, Any], operation: str, **kw: Any) -> None:
        version = self.writer.commit(changes, run_id=self.run_id, operation=operation, **kw)
        if version is not None:
            self.report.catalog_version = version

    def count_failures(self, rows: list[dict[str, Any]]) -> None:
        self.report.failures += len(rows)
        self.codes.update(row["code"] for row in rows)

    def count_warnings(self, codes: Iterable[str]) -> None:
        """Count the warning codes of committed files and volumes (one per subject)."""
        self.warning_codes.update(codes)

    def _note_failed(self, rows: pd.DataFrame | list[dict[str, Any]]) -> None:
        """Remember which series and volumes have failure rows (a superset of the table's:
        the snapshot at planning, this run's own rows and other runs' polled since)."""
        if isinstance(rows, list):
            pairs = [(r["subject_kind"], r["subject"]) for r in rows]
        else:
            pairs = list(zip(rows["subject_kind"], rows["subject"], strict=True))
        self.failed.update(p for p in pairs if p[0] in ("series", "volume"))

    def finish(self, status: str, message: str | None = None) -> IngestReport:
        self.report.status = status
        self.report.failures_by_code = dict(self.codes)
        self.report.warnings_by_code = dict(self.warning_codes)
        self.report.duration_s = time.perf_counter() - self.clock
        self.commit({"runs": [self.run_row(status, message)]}, f"run {status}")
        return self.report
