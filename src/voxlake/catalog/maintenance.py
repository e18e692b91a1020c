"""Catalog maintenance: compaction (``optimize``) and removal of old data (``vacuum``).

Every ingest batch is a small Delta commit, so a busy catalog accumulates many small
Parquet files and log entries. :func:`optimize_catalog` compacts each table (and the
``_commits`` log), writes Delta checkpoints, and records a catalog commit so the latest
version reads the compacted files. Older catalog versions still read the files they were
pinned to until :func:`vacuum_catalog` removes them.

:func:`vacuum_catalog` keeps every catalog version committed within the retention period,
plus the version that was current when the period began, readable; everything else may go:

* Delta files no kept version references (``DeltaTable.vacuum`` with ``keep_versions``
  set to the table versions those catalog versions pin, in full mode, so Parquet files
  left by a killed writer go as well);
* volume revisions ``<store>/<volume_id>/<revision>`` that no kept version's ``volumes``
  rows reference and that are older than the retention period (a rebuilt volume's old
  revision, or a group written by a run killed before its catalog commit);
* ``<store>/.staging/*`` leftovers older than the retention period.

Age protects work in progress: a group written moments ago by a running ingest has no
catalog row yet, so only groups older than the retention period are ever removed. With a
retention below Delta's default (168 hours) Delta's own safety check is switched off;
use that only when no ingest is running. Versions older than the kept ones stop being
readable (``open_catalog(version=N)`` fails to find their files).

The catalog does not import the volume store package: the store is walked with fsspec.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from voxlake.catalog.tables import (
    CLUSTER_BY,
    TABLES,
    CatalogWriter,
    _delta_options,
    table_url,
    writer_properties,
)
from voxlake.errors import CatalogError, ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

    import pandas as pd

__all__ = [
    "DEFAULT_RETENTION_HOURS",
    "OptimizeReport",
    "VacuumReport",
    "optimize_catalog",
    "vacuum_catalog",
]

logger = logging.getLogger(__name__)

#: Delta's default ``delta.deletedFileRetentionDuration`` (7 days).
DEFAULT_RETENTION_HOURS = 168

_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_ALL_TABLES = (*TABLES, "_commits")


@dataclass(frozen=True)
class OptimizeReport:
    """Data files per table before and after compaction, and the catalog version made."""

    files_before: dict[str, int]
    files_after: dict[str, int]
    catalog_version: int


@dataclass(frozen=True)
class VacuumReport:
    """What :func:`vacuum_catalog` removed (or would remove, with ``dry_run``).

    Attributes
    ----------
    cutoff
        Now minus the retention period.
    oldest_kept_version
        Oldest catalog version still readable afterwards (0 for an empty catalog).
    table_files
        Delta data files removed per table (relative paths).
    orphan_groups
        Volume revision groups removed (store-relative ``<volume_id>/<revision>``).
    staging
        Staging leftovers removed (store-relative).
    dry_run
        Nothing was deleted.
    """

    cutoff: dt.datetime
    oldest_kept_version: int
    table_files: dict[str, list[str]] = field(default_factory=dict)
    orphan_groups: list[str] = field(default_factory=list)
    staging: list[str] = field(default_factory=list)
    dry_run: bool = False


def optimize_catalog(
    url: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    target_size: int | None = None,
    cluster: bool = True,
    run_id: str = "optimize",
) -> OptimizeReport:
    """Compact every table's small files, checkpoint the logs, record a catalog commit.

    Parameters
    ----------
    url
        Catalog root.
    storage_options
        delta-rs storage options.
    target_size
        Target file size in bytes (delta-rs default: 100 MiB).
    cluster
        Z-order ``instances`` and ``volumes`` by ``series_key`` (a full rewrite of those
        tables) instead of only compacting them: each file then holds a narrow key range,
        so a series lookup opens one file. Without it, compaction mixes ranges.
    run_id
        Recorded on the Delta commits and the catalog commit.

    Returns
    -------
    OptimizeReport
        Files per table before and after, and the new catalog version. Rows are
        unchanged: compaction rewrites files, not data.
    """
    from deltalake import CommitProperties

    writer = CatalogWriter(url, storage_options=storage_options)
    props = CommitProperties(custom_metadata={"voxlake.run_id": run_id})
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    for name in _ALL_TABLES:
        table = writer._table(name)
        before[name] = len(table.file_uris())
        if cluster and name in CLUSTER_BY and before[name]:
            metrics = table.optimize.z_order(
                [CLUSTER_BY[name][0]],
                target_size=target_size,
                writer_properties=writer_properties(),
                commit_properties=props,
            )
            logger.info("optimize %s (z-order): %s", name, metrics)
        elif before[name] > 1:
            metrics = table.optimize.compact(target_size=target_size, commit_properties=props)
            logger.info("optimize %s: %s", name, metrics)
        table.update_incremental()
        table.create_checkpoint()
        after[name] = len(table.file_uris())
    version = writer.record_commit(run_id=run_id, operation="optimize")
    return OptimizeReport(files_before=before, files_after=after, catalog_version=version)


def _read_commits(url: str, options: dict[str, str] | None) -> pd.DataFrame:
    from voxlake.catalog.query import _commits

    return _commits(url, options)


def _kept_positions(commits: pd.DataFrame, cutoff: dt.datetime) -> list[int]:
    """Positions of the catalog versions that stay readable: newer than the cutoff,
    plus the one that was current at the cutoff."""
    times = commits["committed_at"].tolist()
    kept = [i for i, t in enumerate(times) if t >= cutoff]
    older = [i for i, t in enumerate(times) if t < cutoff]
    if older:
        kept.insert(0, older[-1])
    return kept


def _referenced_paths(
    url: str, options: dict[str, str] | None, versions: list[int]
) -> tuple[set[str], set[str]]:
    """Store paths and store URLs of the volume rows at the given ``volumes`` versions.

    Each Parquet file is read once, whole (rows a later merge deleted included, so the
    result can only be a superset: never too few paths).
    """
    from deltalake import DeltaTable

    paths: set[str] = set()
    urls: set[str] = set()
    seen: set[str] = set()
    if not versions:
        return paths, urls
    table = DeltaTable(table_url(url, "volumes"), storage_options=options)
    for version in sorted(set(versions)):
        table.load_as_version(version)
        for fragment in table.to_pyarrow_dataset().get_fragments():
            if fragment.path in seen:
                continue
            seen.add(fragment.path)
            data = fragment.to_table(columns=["store_path", "store_url"])
            paths.update(p for p in data.column("store_path").to_pylist() if p)
            urls.update(u for u in data.column("store_url").to_pylist() if u)
    return paths, urls


def _normalise(url: str) -> str:
    text = url[len("file://") :] if url.startswith("file://") else url
    if "://" in text:
        return text.rstrip("/")
    return os.path.realpath(text)


def _mtime(fs: Any, path: str) -> float | None:
    """Modification time (epoch seconds) of a group's metadata or of the path itself."""
    for candidate in (f"{path}/zarr.json", path):
        try:
            info = fs.info(candidate)
        except (FileNotFoundError, OSError):
            continue
        value = info.get("mtime", info.get("LastModified", info.get("last_modified")))
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if value is not None:
            return float(value)
    return None


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _store_candidates(
    fs: Any, root: str, referenced: set[str], cutoff: float
) -> tuple[list[str], list[str]]:
    """Unreferenced revision groups and staging entries older than ``cutoff``."""
    orphans: list[str] = []
    staging: list[str] = []
    for entry in fs.ls(root, detail=False):
        name = _name(entry)
        if name == ".staging":
            for item in fs.ls(entry, detail=False):
                age = _mtime(fs, item)
                if age is not None and age < cutoff:
                    staging.append(f".staging/{_name(item)}")
            continue
        if not _HEX.match(name) or not fs.isdir(entry):
            continue
        for group in fs.ls(entry, detail=False):
            revision = _name(group)
            relative = f"{name}/{revision}"
            if not _HEX.match(revision) or relative in referenced:
                continue
            age = _mtime(fs, group)
            if age is not None and age < cutoff:
                orphans.append(relative)
    return sorted(orphans), sorted(staging)


def vacuum_catalog(
    url: str | os.PathLike[str],
    *,
    store: str | os.PathLike[str] | None = None,
    retention_hours: float = DEFAULT_RETENTION_HOURS,
    dry_run: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    store_storage_options: Mapping[str, Any] | None = None,
) -> VacuumReport:
    """Remove table files and volume revisions that no recent catalog version needs.

    Parameters
    ----------
    url
        Catalog root.
    store
        Volume store root to clean as well (orphan revisions, staging leftovers).
    retention_hours
        Catalog versions newer than this stay readable; store groups younger than this
        are never removed. Below Delta's default (168) Delta's check is switched off.
    dry_run
        Report what would be removed; delete nothing.
    storage_options
        delta-rs storage options for the catalog.
    store_storage_options
        fsspec options for the store.

    Returns
    -------
    VacuumReport
    """
    import fsspec

    if retention_hours < 0:
        raise ConfigError("retention_hours must not be negative")
    root = os.fspath(url).rstrip("/")
    options = _delta_options(storage_options)
    now = dt.datetime.now(dt.UTC)
    cutoff = now - dt.timedelta(hours=retention_hours)
    commits = _read_commits(root, options)
    kept = _kept_positions(commits, cutoff)
    rows = commits.iloc[kept] if kept else commits.iloc[:0]

    def versions_of(name: str) -> list[int]:
        column = f"{name}_version"
        if column not in rows.columns:
            return []
        return sorted({int(v) for v in rows[column].dropna().tolist()})

    report = VacuumReport(
        cutoff=cutoff, oldest_kept_version=kept[0] + 1 if kept else 0, dry_run=dry_run
    )
    # Referenced revisions first, while every kept version's files are certainly there.
    referenced, store_urls = _referenced_paths(root, options, versions_of("volumes"))
    if store is not None:
        store_url = os.fspath(store).rstrip("/")
        if store_urls and _normalise(store_url) not in {_normalise(u) for u in store_urls}:
            raise CatalogError(
                "the catalog's volumes do not live in that store",
                code="store_mismatch",
                hint="pass the --store URL the ingest wrote to",
            )
        fs, fs_root = fsspec.core.url_to_fs(store_url, **dict(store_storage_options or {}))
        if fs.exists(fs_root):
            orphans, staging = _store_candidates(fs, fs_root, referenced, cutoff.timestamp())
            report.orphan_groups.extend(orphans)
            report.staging.extend(staging)
    from deltalake import DeltaTable

    hours = math.ceil(retention_hours)  # Delta takes whole hours: round towards keeping
    for name in _ALL_TABLES:
        table = DeltaTable(table_url(root, name), storage_options=options)
        keep = versions_of(name) if name != "_commits" else []
        report.table_files[name] = sorted(
            table.vacuum(
                retention_hours=hours,
                dry_run=dry_run,
                enforce_retention_duration=retention_hours >= DEFAULT_RETENTION_HOURS,
                full=True,
                keep_versions=keep or None,
            )
        )
    if store is not None and not dry_run:
        for relative in [*report.orphan_groups, *report.staging]:
            fs.rm(f"{fs_root.rstrip('/')}/{relative}", recursive=True)
        for volume_id in {r.split("/")[0] for r in report.orphan_groups}:
            folder = f"{fs_root.rstrip('/')}/{volume_id}"
            if fs.exists(folder) and not fs.ls(folder, detail=False):
                fs.rmdir(folder)
    return report
