"""The ingest driver: list, parse headers on workers, commit, plan, build volumes, commit.

The driver never touches pixel data and workers never write the catalog. A volume becomes
visible only when its catalog row is committed, after its Zarr group is complete. Every
step is idempotent: files already catalogued with the same size and mtime are not read
again, plans whose revision is already committed are not rebuilt, and rows merge on keys.
So a run killed anywhere leaves the catalog at its last commit and a re-run finishes it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import random
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from voxlake.catalog.concurrent import ForeignRows
from voxlake.catalog.keymap import KeyMapWriter
from voxlake.catalog.query import open_catalog
from voxlake.catalog.tables import CatalogWriter
from voxlake.cluster import dask_client
from voxlake.config import IngestConfig
from voxlake.errors import CatalogError, ConfigError, SourceError, VoxlakeError
from voxlake.ingest.headers import HeaderBatch, failure_row, read_headers
from voxlake.ingest.readers.dicom import build_volume
from voxlake.ingest.readers.native import STORED_SPAN_COLUMNS, stored_spans, with_pixel_spans
from voxlake.ingest.report import (
    IngestReport,
    ProgressEvent,
    ProgressHandler,
    config_json,
    new_run_id,
    versions_json,
)
from voxlake.ingest.series import VolumePlan, iter_volume_plans
from voxlake.ingest.sources import iter_file_batches

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pandas as pd

    from voxlake.ingest.readers.native import PixelSpan

__all__ = ["ingest"]

logger = logging.getLogger(__name__)

_PLAN_COLUMNS = [
    "url", "content_hash", "patient_key", "study_key", "series_key", "instance_key",
    "has_pixels", "file_format", "modality", "manufacturer", "manufacturer_model_name",
    "body_part_examined", "study_description", "series_description", "protocol_name",
    "series_number", "study_date", "patient_age", "patient_sex",
    "image_orientation_patient", "image_position_patient", "pixel_spacing", "rows", "columns",
    "number_of_frames", "samples_per_pixel", "bits_allocated", "bits_stored",
    "pixel_representation", "rescale_slope", "rescale_intercept", "rescale_type",
    "echo_numbers", "acquisition_number", "temporal_position_identifier", "instance_number",
    "image_type", "echo_time", "repetition_time", "trigger_time", "layout", "frames_json",
    "mosaic_tiles", "b_value", "b_vector", "philips_scale_slope", "array_shape",
    "array_affine", "array_dtype", "photometric_interpretation", "slice_thickness",
]  # fmt: skip

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


def _merge_batches(batches: list[HeaderBatch]) -> HeaderBatch:
    """One batch holding the rows of several header tasks (committed together)."""
    if len(batches) == 1:
        return batches[0]
    merged = HeaderBatch()
    for batch in batches:
        merged.instances += batch.instances
        merged.failures += batch.failures
        merged.bytes_read += batch.bytes_read
        merged.key_map += batch.key_map
        merged.pixel_spans.update(batch.pixel_spans)
    return merged


def _digest(*parts: str) -> str:
    import hashlib

    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).hexdigest()


def _sql_list(values: Sequence[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


class _Run:
    """State of one run on the driver."""

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
        # Catalog URL -> real address, for sources whose address must not be stored
        # (DICOMweb locators hold original UIDs). In memory only, for this run.
        self.locators: dict[str, str] = {}
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

    # -- catalog helpers ---------------------------------------------------------------
    def run_row(self, status: str, message: str | None = None) -> dict[str, Any]:
        r = self.report
        return {
            "run_id": self.run_id,
            "status": status,
            "started_at": self.started,
            "finished_at": None if status == "running" else dt.datetime.now(dt.UTC),
            "sources": self.sources,
            "config_json": config_json(self.config),
            "versions_json": versions_json(),
            "files_seen": r.files_seen,
            "files_skipped": r.files_skipped,
            "instances": r.instances,
            "volumes_written": r.volumes_written,
            "volumes_skipped": r.volumes_skipped,
            "failures": r.failures,
            "failures_by_code": json.dumps(dict(self.codes), sort_keys=True),
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

    # -- stage 1: headers --------------------------------------------------------------
    def seen_files(self) -> tuple[dict[str, tuple[int, float]], dict[str, tuple[int, float]]]:
        catalog = open_catalog(self.catalog_url, storage_options=self.catalog_options)
        # What other runs commit from this snapshot on (concurrent ingests): see _settle.
        self.foreign = ForeignRows(
            self.catalog_url, "instances", run_id=self.run_id, key="url",
            columns=("url", "size", "mtime"), version=catalog.table_versions.get("instances"),
            storage_options=self.catalog_options,
        )  # fmt: skip
        inst = catalog.read("instances", columns=["url", "size", "mtime"])
        fails = catalog.read(
            "failures", columns=["subject", "subject_kind", "size", "mtime", "code"]
        )
        fails = fails[fails["subject_kind"] == "file"]
        retry = fails["code"].isin(RETRYABLE_CODES)  # never "unchanged": read them again
        fails = fails.assign(
            size=fails["size"].where(~retry, -1), mtime=fails.mtime.where(~retry, -1)
        )
        ok = {
            u: (int(s), float(m))
            for u, s, m in zip(inst.url, inst["size"], inst.mtime, strict=True)
        }
        bad = {
            u: (int(s), float(m))
            for u, s, m in zip(fails.subject, fails["size"], fails.mtime, strict=True)
            if s == s and m == m  # not NaN
        }
        return ok, bad

    def headers(self, client: Any) -> None:
        from distributed import as_completed

        ok, bad = self.seen_files()
        pending = as_completed()
        submitted = 0
        done = 0
        # Tasks are a quarter of a commit batch, at most 64 files: with few, large tasks
        # one worker would still parse while the other idles. Results are committed a
        # batch at a time, so the number of Delta commits does not grow.
        task_size = min(64, max(16, self.config.batch_size // 4))
        results: list[HeaderBatch] = []

        def collect(batch: HeaderBatch, *, flush: bool = False) -> None:
            nonlocal done
            results.append(batch)
            rows = sum(len(b.instances) + len(b.failures) for b in results)
            if rows >= self.config.batch_size or flush:
                done += self._commit_headers(_merge_batches(results), ok, bad)
                results.clear()
                self.progress(ProgressEvent("headers", done, submitted, self.report.bytes_read))

        for files, problems in iter_file_batches(
            self.sources,
            batch_size=self.config.batch_size,
            storage_options=self.config.storage_options,
            max_member_bytes=self.config.max_file_bytes,
            secret=self.secret,
        ):
            self.report.files_seen += len(files)
            self.locators.update((f.url, f.locator) for f in files if f.locator)
            fresh = [f for f in files if ok.get(f.url, bad.get(f.url)) != (f.size, f.mtime)]
            self.report.files_skipped += len(files) - len(fresh)
            if problems:
                rows = [
                    failure_row(
                        subject=p.url,
                        subject_kind="file",
                        error=VoxlakeError(p.message, code=p.code),
                        run_id=self.run_id,
                        stage="file",
                    )
                    for p in problems
                ]
                self.count_failures(rows)
                self.commit({"failures": rows}, "listing")
            for start in range(0, len(fresh), task_size):
                pending.add(
                    client.submit(
                        read_headers,
                        fresh[start : start + task_size],
                        secret=self.secret,
                        config=self.config,
                        run_id=self.run_id,
                        pure=False,
                    )
                )
            submitted += len(fresh)
            self.progress(ProgressEvent("files", self.report.files_seen, None))
            while pending.has_ready():
                collect(next(pending).result())
        for future in pending:
            collect(future.result())
        if results:
            collect(HeaderBatch(), flush=True)

    def _commit_headers(self, batch: HeaderBatch, ok: dict[str, Any], bad: dict[str, Any]) -> int:
        if self.key_map is not None and batch.key_map:
            self.key_map.write(batch.key_map, run_id=self.run_id)  # before keys reach the catalog
        self.report.bytes_read += batch.bytes_read
        self.report.instances += len(batch.instances)
        if not self.config.headers_only:  # no volume task of this run will read them
            self.pixel_spans.update(batch.pixel_spans)
        self.count_failures(batch.failures)
        self._absorb(self.foreign.poll(), ok)
        # A file that now parses clears its old failure; one that now fails loses its row.
        healed = [r["url"] for r in batch.instances if r["url"] in bad]
        broken = [r["subject"] for r in batch.failures if r["subject"] in ok]
        if healed:
            self.writer.delete("failures", f"subject IN ({_sql_list(healed)})", run_id=self.run_id)
        if broken:
            self.writer.delete("instances", f"url IN ({_sql_list(broken)})", run_id=self.run_id)
        # The poll above is current unless this run just changed `instances` itself.
        fresh = self._append_new(batch.instances, ok, polled=not broken)
        appended = {r["url"] for r in fresh}
        changed = [r for r in batch.instances if r["url"] in ok and r["url"] not in appended]
        self.commit({"instances": changed, "failures": batch.failures}, "headers")
        if (fresh or healed or broken) and not (changed or batch.failures):
            self.report.catalog_version = self.writer.record_commit(
                run_id=self.run_id, operation="headers"
            )
        return len(batch.instances) + len(batch.failures)

    def _append_new(
        self, rows: list[dict[str, Any]], ok: dict[str, Any], *, polled: bool
    ) -> list[dict[str, Any]]:
        """Append the rows of files no run has catalogued; return them.

        The append lands only if nobody committed to ``instances`` since the poll that
        decided what is new; otherwise the rows another run added meanwhile are absorbed
        (merged as changed rows instead) and the rest tried again. Two concurrent runs can
        therefore never both append one file, not even for one table version.
        """
        for attempt in range(1, APPEND_ATTEMPTS + 1):
            if attempt > 1 or not polled:
                self._absorb(self.foreign.poll(), ok)
            fresh = [r for r in rows if r["url"] not in ok]
            if not fresh:
                return []
            version = self.writer.append_if_current(
                "instances", fresh, run_id=self.run_id, version=self.foreign.version
            )
            if version is not None:
                ok.update((r["url"], (int(r["size"]), float(r["mtime"]))) for r in fresh)
                return fresh
            time.sleep(random.uniform(0.01, 0.05) * attempt)  # another run committed: look again
        raise CatalogError(
            f"could not append to 'instances' in {APPEND_ATTEMPTS} attempts: other writers"
            " kept committing in between",
            code="catalog_contended",
            hint="run again; fewer concurrent ingests into one catalog commit sooner",
        )

    @staticmethod
    def _absorb(rows: pd.DataFrame, ok: dict[str, Any]) -> None:
        """Files another run catalogued meanwhile: merged, not appended, from now on."""
        ok.update(
            (u, (int(s), float(m)))
            for u, s, m in zip(rows["url"], rows["size"], rows["mtime"], strict=True)
        )

    def check_sources(self) -> None:
        """Files the source stopped delivering could be slices of any series: building
        volumes now could store a series without them. Stop instead; a re-run reads them."""
        unread = self.codes.get("source_unreachable", 0)
        if unread:
            raise SourceError(
                f"{unread} files could not be read (the source stopped answering);"
                " no volume was built",
                code="source_unreachable",
                hint="run the same command again when the source answers",
            )

    # -- stage 2: volumes --------------------------------------------------------------
    def plan_and_submit(self, client: Any) -> dict[Any, VolumePlan]:
        """Plan the catalogued series; submit each volume to build as soon as it is planned
        (the workers start while later series are planned). Returns future -> plan."""
        catalog = open_catalog(self.catalog_url, storage_options=self.catalog_options)
        columns = list(dict.fromkeys([*_PLAN_COLUMNS, *STORED_SPAN_COLUMNS]))
        instances = catalog.read("instances", columns=columns)
        # Files read by earlier runs (a --headers-only survey, say): their pixels are read
        # at the offsets those runs kept, like this run's own files.
        self.pixel_spans.update(stored_spans(instances, skip=self.pixel_spans))
        volumes = catalog.read("volumes", columns=["volume_id", "revision"])
        failures = catalog.read(
            "failures", columns=["failure_id", "code", "subject_kind", "subject"]
        )
        known_failures = set(failures.failure_id)
        self._note_failed(failures)
        self.foreign_failures = ForeignRows(
            self.catalog_url, "failures", run_id=self.run_id, key="failure_id",
            columns=("subject_kind", "subject"), version=catalog.table_versions.get("failures"),
            storage_options=self.catalog_options,
        )  # fmt: skip
        final = set(failures.failure_id[~failures.code.isin(RETRYABLE_CODES)])
        committed = dict(zip(volumes.volume_id, volumes.revision, strict=True))
        # Preprocessing changes what is stored: it is part of the revision.
        steps = (
            json.dumps(dataclasses.asdict(self.config.preprocess), sort_keys=True)
            if self.config.preprocess.enabled
            else None
        )
        rows: list[dict[str, Any]] = []
        futures: dict[Any, VolumePlan] = {}
        for result in iter_volume_plans(
            instances,
            spacing_tolerance=self.config.spacing_tolerance,
            philips_scaling=self.config.philips_scaling,
            resample_irregular=self.config.resample_irregular,
            max_voxels=self.config.max_voxels,
        ):
            if not isinstance(result, VolumePlan):
                row = failure_row(
                    subject=result.subject, subject_kind="series", error=result.error,
                    run_id=self.run_id,
                )  # fmt: skip
                if row["failure_id"] not in known_failures:
                    rows.append(row)
                continue
            plan = result
            if steps is not None:
                plan = dataclasses.replace(plan, revision=_digest(plan.revision, steps))
            fid = failure_row(
                subject=plan.volume_id, subject_kind="volume", error=VoxlakeError(""),
                run_id="", stage="volume", discriminator=plan.revision,
            )["failure_id"]  # fmt: skip
            if committed.get(plan.volume_id) == plan.revision or fid in final:
                self.report.volumes_skipped += 1
            else:
                futures[self._submit(client, plan)] = plan
        self.count_failures(rows)
        self.commit({"failures": rows}, "assemble")
        self._note_failed(rows)
        return futures

    def _submit(self, client: Any, plan: VolumePlan) -> Any:
        return client.submit(
            build_volume,
            self._locate(plan),
            store_url=self.store_url,
            store_config=self.config.store,
            run_id=self.run_id,
            max_file_bytes=self.config.max_file_bytes,
            storage_options=self.config.storage_options,
            store_storage_options=self.store_options,
            preprocess=self.config.preprocess if self.config.preprocess.enabled else None,
            key=f"volume-{plan.volume_id}-{plan.revision}-{self.run_id}",
            pure=False,
        )

    def _locate(self, plan: VolumePlan) -> VolumePlan:
        """The plan with this run's pixel spans, and in-memory locators in place of
        catalog URLs (DICOMweb)."""
        plan = with_pixel_spans(plan, self.pixel_spans)
        if not self.locators or not any(s.url in self.locators for s in plan.slices):
            return plan
        slices = tuple(
            dataclasses.replace(s, url=self.locators.get(s.url, s.url)) for s in plan.slices
        )
        return dataclasses.replace(plan, slices=slices)

    def volumes(self, futures: dict[Any, VolumePlan]) -> None:
        """Commit the volumes of ``futures`` (from :meth:`plan_and_submit`) as they complete."""
        from distributed import as_completed

        rows: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        last_commit = time.perf_counter()
        every = max(1, min(32, len(futures) // 10))
        self.progress(ProgressEvent("volumes", 0, len(futures)))
        for done, future in enumerate(as_completed(futures), start=1):
            plan = futures[future]
            try:
                rows.append(future.result())
            except VoxlakeError as exc:
                if self.config.on_error == "raise":
                    raise
                failures.append(self._volume_failure(plan, exc))
            except Exception as exc:
                if self.config.on_error == "raise":
                    raise
                error = VoxlakeError(
                    f"{type(exc).__name__} while building the volume", code="volume_error"
                )
                failures.append(self._volume_failure(plan, error))
            self.progress(ProgressEvent("volumes", done, len(futures)))
            waited = time.perf_counter() - last_commit
            if waited >= VOLUME_COMMIT_SECONDS[1] or (
                waited >= VOLUME_COMMIT_SECONDS[0] and len(rows) + len(failures) >= every
            ):
                self._commit_volumes(rows, failures)
                rows, failures, last_commit = [], [], time.perf_counter()
        self._commit_volumes(rows, failures)

    def _volume_failure(self, plan: VolumePlan, error: VoxlakeError) -> dict[str, Any]:
        return failure_row(
            subject=plan.volume_id, subject_kind="volume", error=error, run_id=self.run_id,
            stage="volume", discriminator=plan.revision,
        )  # fmt: skip

    def _commit_volumes(self, rows: list[dict[str, Any]], failures: list[dict[str, Any]]) -> None:
        self.report.volumes_written += len(rows)
        self.count_failures(failures)
        # The series now assembles: clear its old assembly (and volume) failures, if it
        # has any (a delete that matches nothing is still a Delta commit).
        if self.foreign_failures is not None:
            self._note_failed(self.foreign_failures.poll())
        stale = {
            kind: sorted({r[column] for r in rows if (kind, r[column]) in self.failed})
            for kind, column in (("series", "series_key"), ("volume", "volume_id"))
        }
        if any(stale.values()):
            predicate = " OR ".join(
                f"(subject_kind = '{kind}' AND subject IN ({_sql_list(subjects)}))"
                for kind, subjects in stale.items()
                if subjects
            )
            self.writer.delete("failures", predicate, run_id=self.run_id)
        self.commit({"volumes": rows, "failures": failures}, "volumes")
        self._note_failed(failures)

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
        self.report.duration_s = time.perf_counter() - self.clock
        self.commit({"runs": [self.run_row(status, message)]}, f"run {status}")
        return self.report


def _absolute(url: str | os.PathLike[str]) -> str:
    """Local paths become absolute (volume rows must be readable from any folder)."""
    text = os.fspath(url)
    return text if "://" in text else os.path.abspath(text)


def ingest(
    sources: Sequence[str | os.PathLike[str]],
    *,
    catalog: str | os.PathLike[str],
    store: str | os.PathLike[str] | None = None,
    config: IngestConfig | None = None,
    client: Any = None,
    catalog_storage_options: dict[str, Any] | None = None,
    store_storage_options: dict[str, Any] | None = None,
    progress: ProgressHandler | None = None,
) -> IngestReport:
    """Ingest DICOM sources into a catalog and a volume store.

    Parameters
    ----------
    sources
        Folders, files or fsspec URLs to crawl.
    catalog
        Catalog root URL (created when missing).
    store
        Volume store root URL (created when missing); may be left out only with
        ``config.headers_only``.
    config
        Run options; ``config.secret`` or ``VOXLAKE_SECRET`` must be set.
    client
        An existing ``distributed.Client``; default: a cluster from ``config``.
    catalog_storage_options, store_storage_options
        Options for remote catalog (delta-rs) and store (fsspec).
    progress
        Called with :class:`ProgressEvent` s.

    Returns
    -------
    IngestReport
        Counts, failures by code, bytes, duration and the catalog version reached.

    Examples
    --------
    >>> report = ingest(["dicom/"], catalog="catalog", store="volumes.zarr",
    ...                 config=IngestConfig(secret="..."))  # doctest: +SKIP
    """
    config = config or IngestConfig()
    if store is None and not config.headers_only:
        raise ConfigError(
            "a volume store is needed to build volumes",
            hint="pass store=... (--store), or set headers_only (--headers-only) to "
            "catalog the files without building volumes",
        )
    run = _Run(
        [os.fspath(s) for s in sources],
        catalog=_absolute(catalog),
        store=_absolute(store) if store is not None else "",
        config=config,
        catalog_storage_options=catalog_storage_options,
        store_storage_options=store_storage_options,
        progress=progress,
    )
    run.commit({"runs": [run.run_row("running")]}, "run start")
    try:
        with dask_client(config, client=client) as dask:
            run.report.dashboard_link = getattr(dask, "dashboard_link", None)
            run.progress(ProgressEvent("cluster", 0, None, message=run.report.dashboard_link))
            run.headers(dask)
            run.check_sources()
            if not config.headers_only:
                run.volumes(run.plan_and_submit(dask))
    except KeyboardInterrupt:
        run.finish("interrupted", "interrupted by the user")
        raise
    except VoxlakeError as exc:
        run.finish("failed", f"{exc.code}: {exc.message}")
        raise
    except Exception as exc:
        run.finish("failed", f"{type(exc).__name__}")
        raise
    return run.finish("completed")
