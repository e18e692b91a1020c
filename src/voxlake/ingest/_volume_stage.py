"""Stage 2 of an ingest run: plan the catalogued series, build each volume on a worker,
commit the volume rows as they complete."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from voxlake.catalog.concurrent import ForeignRows
from voxlake.catalog.query import open_catalog
from voxlake.errors import AssemblyError, StoreError, VoxlakeError
from voxlake.ingest import fetched
from voxlake.ingest._run_state import RETRYABLE_CODES, VOLUME_COMMIT_SECONDS, RunState, sql_list
from voxlake.ingest.archives import archive_of
from voxlake.ingest.headers import failure_row
from voxlake.ingest.readers.dicom import build_volume
from voxlake.ingest.readers.native import STORED_SPAN_COLUMNS, stored_spans, with_pixel_spans
from voxlake.ingest.report import ProgressEvent
from voxlake.ingest.series import VolumePlan, iter_volume_plans
from voxlake.ingest.warning_codes import recording

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

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


@dataclasses.dataclass(frozen=True)
class Refused:
    """A volume task's failure, returned rather than raised (see :func:`build_volume_task`).
    ``stop``: the store takes no more data, so the run stops instead of quarantining."""

    error: VoxlakeError
    stop: bool = False


#: What an ``OSError`` says when the store (or the worker's disk) takes no more data:
#: every volume after it would fail the same way.
_NO_ROOM: dict[int, str] = {
    errno.ENOSPC: "store_full",
    errno.EDQUOT: "store_full",
    errno.EROFS: "store_read_only",
}
#: Codes of volume-task errors that stop the run whatever ``on_error`` says.
_STOPS = frozenset(_NO_ROOM.values())


def build_volume_task(plan: VolumePlan, **kwargs: Any) -> dict[str, Any] | Refused:
    """:func:`~voxlake.ingest.readers.dicom.build_volume` on a worker, with its failures
    as values. A task that raises is logged by its worker as "Compute Failed" with a
    traceback: once per refused series on the console, for what is an expected,
    catalogued outcome. An error no failure code describes still raises. The codes of the
    warnings the readers raised while building it are the row's ``warnings``."""
    try:
        with recording() as warned:
            row = build_volume(plan, **kwargs)
        codes = warned.since(0)
        if row.get("intensity_non_finite"):
            codes = sorted({*codes, "non_finite_values"})
        row["warnings"] = codes
        return row
    except (VoxlakeError, OSError) as exc:
        full = _no_room(exc)
        if full is not None:
            return Refused(full, stop=True)
        if isinstance(exc, VoxlakeError):
            return Refused(exc)
        raise


def _no_room(exc: BaseException) -> StoreError | None:
    """The run-stopping error for `exc` (or what caused it) when it says the store is
    full or read-only."""
    seen: BaseException | None = exc
    while seen is not None:
        code = _NO_ROOM.get(getattr(seen, "errno", None) or -1)
        if code is not None:
            assert isinstance(seen, OSError)
            return StoreError(
                f"the volume store takes no more data: {os.strerror(seen.errno or 0)}",
                code=code,
                hint="make room in the store (or the workers' temporary folder) and run the "
                "same command again: what was committed stays, and the run goes on from there",
            )
        seen = seen.__cause__ or seen.__context__
    return None


def _digest(*parts: str) -> str:
    import hashlib

    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).hexdigest()


def _stale_volumes(volumes: pd.DataFrame, instances: pd.DataFrame) -> pd.DataFrame:
    """The volume rows built from a file the catalog no longer holds with that content.

    A file's row is replaced when its URL is read again with other content (an export
    folder refilled in place), so a volume can outlive its inputs: its series may now hold
    other slices, fail to assemble, or be gone altogether, and training would still select
    the old volume. Files gone from their source keep their rows (a source not mounted must
    not empty the catalog), so their volumes are not stale. Rows without source hashes
    (older catalogs) are stale only when their series has no file left."""
    if volumes.empty:
        return volumes
    hashes = set(instances.content_hash.dropna())
    series = set(instances.series_key.dropna())

    stale = [
        series_key not in series
        if sources is None or len(sources) == 0
        else not hashes.issuperset(sources)
        for series_key, sources in zip(volumes.series_key, volumes.source_hashes, strict=True)
    ]
    return volumes[stale]


def _superseded(volumes: pd.DataFrame, planned: dict[str, set[str]]) -> np.ndarray:
    """Which ``volumes`` rows belong to series that plan other volumes now: a series
    split differently (files of a second echo or orientation added, say) plans new volume
    ids, and its old volume would stay beside them, a duplicate for training. Series that
    plan nothing now (every part failed) keep theirs (see :func:`_stale_volumes` for
    changed files)."""
    import numpy as np

    return np.array(
        [
            series in planned and volume not in planned[series]
            for series, volume in zip(volumes.series_key, volumes.volume_id, strict=True)
        ],
        dtype=bool,
    )


class VolumeStage(RunState):
    """The volume builds of a run."""

    def plan_and_submit(self, client: Any) -> dict[Any, VolumePlan]:
        """Plan the catalogued series; submit each volume to build as soon as it is planned
        (the workers start while later series are planned). Returns future -> plan."""
        catalog = open_catalog(self.catalog_url, storage_options=self.catalog_options)
        columns = list(dict.fromkeys([*_PLAN_COLUMNS, *STORED_SPAN_COLUMNS]))
        instances = catalog.read("instances", columns=columns)
        # Files read by earlier runs (a --headers-only survey, say): their pixels are read
        # at the offsets those runs kept, like this run's own files.
        self.pixel_spans.update(stored_spans(instances, skip=self.pixel_spans))
        volumes = catalog.read(
            "volumes", columns=["volume_id", "revision", "series_key", "source_hashes"]
        )
        stale = _stale_volumes(volumes, instances)
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
        rebuilt: set[str] = set()
        planned: dict[str, set[str]] = {}  # series_key -> the volume ids it plans now
        instances, refused = self._without_damaged_archives(instances)
        rows += [r for r in refused if r["failure_id"] not in known_failures]
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
            planned.setdefault(plan.series_key, set()).add(plan.volume_id)
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
                rebuilt.add(plan.volume_id)
        # A stale volume that is being rebuilt is replaced by its new row (or retired if
        # the build fails); the others are retired now, with those superseded.
        self.stale = {
            v: r for v, r in zip(stale.volume_id, stale.revision, strict=True) if v in rebuilt
        }
        done = stale.index[~stale.volume_id.isin(rebuilt)]
        self._retire(volumes[volumes.index.isin(done) | _superseded(volumes, planned)])
        self.count_failures(rows)
        self.commit({"failures": rows}, "assemble")
        self._note_failed(rows)
        return futures

    def _retire(self, volumes: pd.DataFrame) -> None:
        """Delete the rows of ``volumes`` (their store groups stay for pinned older
        versions until ``vacuum``) in a commit of their own."""
        if volumes.empty:
            return
        import pyarrow as pa

        rows = pa.Table.from_pandas(volumes[["volume_id", "revision"]], preserve_index=False)
        self.writer.delete_rows("volumes", rows, keys=("volume_id", "revision"), run_id=self.run_id)
        self.report.catalog_version = self.writer.record_commit(
            run_id=self.run_id, operation="retire volumes"
        )
        self.report.volumes_retired += len(volumes)

    def _without_damaged_archives(
        self, instances: pd.DataFrame
    ) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
        """The instances of series with no file in an archive this run found cut or damaged,
        and a failure row for each of the others: their last files may be missing, and a
        volume built from the rest would be shorter than the series without a word."""
        if not self.damaged_archives or instances.empty:
            return instances, []
        hit = instances.url.map(archive_of).isin(self.damaged_archives)
        keys = sorted(set(instances.series_key[hit].dropna()))
        error = AssemblyError(
            "files of this series come from an archive that is cut or damaged, so some may "
            "be missing: replace the archive, then run again",
            code="archive_damaged",
        )
        rows = [
            failure_row(subject=key, subject_kind="series", error=error, run_id=self.run_id)
            for key in keys
        ]
        return instances[~instances.series_key.isin(keys)], rows

    def _submit(self, client: Any, plan: VolumePlan) -> Any:
        # Where the series' PACS instances were kept (most of them): a placement, not a
        # restriction, so the volume is still built when that worker is gone.
        holders = Counter(self.kept[s.url] for s in plan.slices if s.url in self.kept)
        placement: dict[str, Any] = {}
        if holders:
            placement = {"workers": [holders.most_common(1)[0][0]], "allow_other_workers": True}
        return client.submit(
            build_volume_task,
            self._locate(plan),
            store_url=self.store_url,
            store_config=self.config.store,
            run_id=self.run_id,
            max_file_bytes=self.config.max_file_bytes,
            storage_options=self.config.storage_options,
            store_storage_options=self.store_options,
            preprocess=self.config.preprocess if self.config.preprocess.enabled else None,
            read_ahead=self.config.read_ahead,
            key=f"volume-{plan.volume_id}-{plan.revision}-{self.run_id}",
            pure=False,
            **placement,
        )

    def _locate(self, plan: VolumePlan) -> VolumePlan:
        """The plan with this run's pixel spans, and in-memory locators in place of
        catalog URLs (PACS sources)."""
        plan = with_pixel_spans(plan, self.pixel_spans)
        if not self.locators or not any(s.url in self.locators for s in plan.slices):
            return plan
        slices = tuple(
            dataclasses.replace(s, url=self.locators.get(s.url, s.url)) for s in plan.slices
        )
        return dataclasses.replace(plan, slices=slices)

    def drop_kept(self, client: Any) -> None:
        """Remove the PACS instances the workers kept for this run (best effort: a
        worker that is gone took its local directory with it)."""
        if not self.kept:
            return
        try:
            client.run(fetched.drop, self.run_id, workers=sorted(set(self.kept.values())))
        except Exception as exc:  # a worker gone meanwhile: nothing of it to remove
            logger.warning("could not remove kept PACS instances: %s", type(exc).__name__)

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
                result = future.result()
                if isinstance(result, Refused):
                    if result.stop:
                        self._commit_before_stopping(rows, failures)
                    raise result.error
                rows.append(result)
            except VoxlakeError as exc:
                if self.config.on_error == "raise" or exc.code in _STOPS:
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

    def _commit_before_stopping(
        self, rows: list[dict[str, Any]], failures: list[dict[str, Any]]
    ) -> None:
        """Commit what completed before the store filled up (the catalog may be on the
        same full disk: then the run stops without it, and a re-run finds those volumes
        in the store)."""
        try:
            self._commit_volumes(rows, failures)
        except Exception:
            logger.warning("could not commit the last volumes before stopping", exc_info=True)
        rows.clear()
        failures.clear()

    def _volume_failure(self, plan: VolumePlan, error: VoxlakeError) -> dict[str, Any]:
        return failure_row(
            subject=plan.volume_id, subject_kind="volume", error=error, run_id=self.run_id,
            stage="volume", discriminator=plan.revision,
        )  # fmt: skip

    def _commit_volumes(self, rows: list[dict[str, Any]], failures: list[dict[str, Any]]) -> None:
        self.report.volumes_written += len(rows)
        self.count_failures(failures)
        self.count_warnings(code for row in rows for code in row.get("warnings") or ())
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
                f"(subject_kind = '{kind}' AND subject IN ({sql_list(subjects)}))"
                for kind, subjects in stale.items()
                if subjects
            )
            self.writer.delete("failures", predicate, run_id=self.run_id)
        self.commit({"volumes": rows, "failures": failures}, "volumes")
        self._note_failed(failures)
        failed = {f["subject"] for f in failures} & self.stale.keys()
        if failed:  # their inputs changed and no longer build: retire the old rows
            import pandas as pd

            self._retire(
                pd.DataFrame(
                    {
                        "volume_id": sorted(failed),
                        "revision": [self.stale[v] for v in sorted(failed)],
                    }
                )
            )
            for volume_id in failed:
                del self.stale[volume_id]
