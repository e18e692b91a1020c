"""Writing the catalog: Delta tables under one root, committed as transactions.

Layout under the catalog root URL::

    <root>/instances/  volumes/  failures/  runs/  labels/  splits/   one Delta table each
    <root>/_commits/                                                   the catalog's own log

Each table versions independently in Delta. The ``_commits`` table ties them together:
every catalog commit (a batch of instance rows, some volume rows, a run update) writes its
table(s) and then appends one row recording the latest version of *every* table. The
catalog version users pin (``open_catalog(url, version=N)``) is the position of a row in
``_commits`` (in commit-time order, from 1), so one integer names a consistent snapshot of
all tables. A writer killed between a table write and its ``_commits`` row leaves the
catalog at its previous version; the orphan table commit becomes visible only with the next
catalog commit, and it holds only complete rows (rows are idempotent merges on keys).

Schema evolution: opening a writer adds the columns (and tables) that
:mod:`voxlake.catalog.schema` defines but an older catalog lacks, as nullable columns.
``_commits`` rows written before a table existed hold null for its version; readers treat
that table as empty at those catalog versions.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from voxlake.catalog.schema import SCHEMAS, TABLE_KEYS
from voxlake.errors import CatalogError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

__all__ = [
    "CLUSTER_BY",
    "COMMITS_SCHEMA",
    "ROW_GROUP_ROWS",
    "TABLES",
    "CatalogWriter",
    "data_files",
    "rows_to_table",
    "table_url",
    "writer_properties",
]

logger = logging.getLogger(__name__)

TABLES: tuple[str, ...] = ("instances", "volumes", "failures", "runs", "labels", "splits")

#: Rows are written sorted by these columns, so each Parquet row group covers a narrow key
#: range and a lookup (all instances of a series) reads one row group per file, not all.
#: ``optimize_catalog`` Z-orders the same tables by the same column across files.
CLUSTER_BY: dict[str, tuple[str, ...]] = {
    "instances": ("series_key", "instance_number"),
    "volumes": ("series_key",),
}

#: Rows per Parquet row group of the clustered tables: small enough that a lookup of many
#: series decodes few rows, large enough that footers stay small and full scans cheap.
#: Against 4,096, through DuckDB: 100 series 1.25x cheaper, full scans and single-series
#: lookups 1.15 to 1.3x dearer (benchmarks/catalog.py, docs/performance.md).
ROW_GROUP_ROWS = 2048

COMMITS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("operation", pa.string()),
        pa.field("committed_at", pa.timestamp("us", tz="UTC")),
        *(pa.field(f"{name}_version", pa.int64()) for name in TABLES),
    ],
    metadata={"description": "One row per catalog commit: the table versions it makes visible."},
)


def table_url(root: str | os.PathLike[str], name: str) -> str:
    """URL of one table under the catalog root."""
    return f"{os.fspath(root).rstrip('/')}/{name}"


def data_files(table: Any, url: str) -> list[str]:
    """The Parquet files of the Delta `table` at `url`, as paths or URLs that open as
    given: `url` joined with each file's name.

    delta-rs percent-encodes ``file_uris()`` (a catalog under ``my data/`` comes back as
    ``my%20data/``, which no file system opens); voxlake's tables are not partitioned, so
    every file lies right under the table and its name is plain.
    """
    root = url.rstrip("/")
    return [f"{root}/{uri.rsplit('/', 1)[-1]}" for uri in table.file_uris()]


def _delta_options(storage_options: Mapping[str, Any] | None) -> dict[str, str] | None:
    """delta-rs options from fsspec-style or delta-rs-style options (see voxlake.storage)."""
    from voxlake.storage import delta_storage_options

    return delta_storage_options(dict(storage_options)) if storage_options else None


def rows_to_table(name: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build an arrow table with the catalog schema of ``name`` from row dicts.

    Missing columns become nulls; unknown keys are an error (the schema is the contract).
    """
    schema = SCHEMAS[name]
    rows = list(rows)
    unknown = {k for row in rows for k in row} - set(schema.names)
    if unknown:
        raise CatalogError(f"rows for {name!r} have unknown columns: {sorted(unknown)}")
    columns = {field.name: [row.get(field.name) for row in rows] for field in schema}
    try:
        return pa.table(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise CatalogError(f"rows for {name!r} do not match the schema: {exc}") from exc


def writer_properties() -> Any:
    """delta-rs ``WriterProperties`` of the clustered tables.

    Row groups of ROW_GROUP_ROWS rows, and a Bloom filter on ``series_key`` in each: a
    commit's file spans the whole key range, so its row-group statistics cannot rule out
    a key the file lacks, but the filter can (DuckDB reads it: a lookup on a catalog of 20
    commit files read 1 row group instead of 26, 100 series 236 instead of 496).
    """
    from deltalake import BloomFilterProperties, ColumnProperties, WriterProperties

    bloom = BloomFilterProperties(True, fpp=0.01, ndv=ROW_GROUP_ROWS)
    return WriterProperties(
        max_row_group_size=ROW_GROUP_ROWS,
        column_properties={"series_key": ColumnProperties(bloom_filter_properties=bloom)},
    )


def _sql_literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CatalogError(f"cannot use a {type(value).__name__} value as a catalog key")
    return repr(value)


def _key_predicate(table: pa.Table, keys: tuple[str, ...]) -> str:
    """SQL predicate matching exactly the key values of ``table``'s rows."""
    columns = [table.column(k).to_pylist() for k in keys]
    if any(v is None for column in columns for v in column):
        raise CatalogError(f"catalog keys {keys} must not be null")
    if len(keys) == 1:
        values = sorted(set(columns[0]))
        return f"{keys[0]} IN ({', '.join(_sql_literal(v) for v in values)})"
    rows = sorted(set(zip(*columns, strict=True)))
    return " OR ".join(
        "(" + " AND ".join(f"{k} = {_sql_literal(v)}" for k, v in zip(keys, row, strict=True)) + ")"
        for row in rows
    )


def _dedupe_last(table: pa.Table, keys: tuple[str, ...]) -> pa.Table:
    """Keep the last row per key (a merge source must not match a target row twice)."""
    if table.num_rows < 2:
        return table
    seen: dict[tuple[Any, ...], int] = {}
    key_columns = [table.column(k).to_pylist() for k in keys]
    for index, key in enumerate(zip(*key_columns, strict=True)):
        seen[key] = index
    if len(seen) == table.num_rows:
        return table
    return table.take(sorted(seen.values()))


#: Attempts of a commit that conflicts with a concurrent writer's. delta-rs detects the
#: conflict (a merge or delete whose rows another writer changed meanwhile, two catalog
#: commits at once) and refuses; the write is planned again on the new table state.
COMMIT_ATTEMPTS = 10


def _prepare(
    name: str, rows: pa.Table | Iterable[Mapping[str, Any]]
) -> tuple[pa.Table, dict[str, Any]]:
    """Rows to write to ``name``: one per key (the last), sorted by the table's clustering
    columns, with the writer options they need."""
    table = rows if isinstance(rows, pa.Table) else rows_to_table(name, rows)
    table = _dedupe_last(table, TABLE_KEYS[name])
    options: dict[str, Any] = {}
    if name in CLUSTER_BY:
        table = table.sort_by([(c, "ascending") for c in CLUSTER_BY[name]])
        options["writer_properties"] = writer_properties()
    return table, options


def _retry_conflicts(target: Any, write: Callable[[], None]) -> None:
    """Run ``write``; after a Delta commit conflict, refresh ``target`` and run it again."""
    from deltalake.exceptions import CommitFailedError

    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            write()
            return
        except CommitFailedError:
            if attempt == COMMIT_ATTEMPTS:
                raise
            logger.debug("commit conflict (attempt %d), retrying", attempt)
            time.sleep(random.uniform(0.005, 0.05) * attempt)  # de-synchronise the writers
            target.update_incremental()


def _add_actions(table: Any) -> pa.Table:
    return pa.table(table.get_add_actions(flatten=True))


def _count_rows(table: Any) -> int:
    """Rows in a Delta table, from the log's file statistics (no data file is read)."""
    import pyarrow.compute as pc

    actions = _add_actions(table)
    if actions.num_rows == 0:
        return 0
    counts = actions.column("num_records")
    if counts.null_count:
        return int(table.to_pyarrow_dataset().count_rows())
    return int(pc.sum(counts).as_py())


def _last_commit_time(commits: Any) -> dt.datetime | None:
    """Upper bound of the latest ``committed_at`` (file statistics hold milliseconds)."""
    import pyarrow.compute as pc

    actions = _add_actions(commits)
    if actions.num_rows == 0:
        return None
    if (
        "max.committed_at" in actions.column_names
        and not actions.column("max.committed_at").null_count
    ):
        last = pc.max(actions.column("max.committed_at")).as_py()
        # Statistics are truncated to the millisecond: the true value is below last + 1 ms.
        return None if last is None else last + dt.timedelta(microseconds=999)
    values = commits.to_pyarrow_dataset().to_table(columns=["committed_at"]).column(0)
    last = pc.max(values).as_py() if len(values) else None
    return last


class CatalogWriter:
    """Commits rows to the catalog's Delta tables (driver side only).

    Parameters
    ----------
    url
        Catalog root (local path or ``s3://bucket/prefix``).
    storage_options
        delta-rs storage options (``AWS_ENDPOINT_URL``, ``AWS_REGION``...).
    """

    def __init__(
        self, url: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        self.url = os.fspath(url).rstrip("/")
        self.storage_options = _delta_options(storage_options)
        self._tables: dict[str, Any] = {}
        self._ensure_tables()

    def _ensure_tables(self) -> None:
        from deltalake import DeltaTable

        if "://" not in self.url:
            os.makedirs(self.url, exist_ok=True)
        schemas = {**SCHEMAS, "_commits": COMMITS_SCHEMA}
        for name, schema in schemas.items():
            uri = table_url(self.url, name)
            try:
                DeltaTable.create(
                    uri,
                    schema,
                    mode="ignore",
                    name=name,
                    description=schema.metadata.get(b"description", b"").decode(),
                    storage_options=self.storage_options,
                )
                self._evolve(name, schema)
            except Exception as exc:
                raise CatalogError(
                    f"cannot create catalog table {name!r} at {self.url}: {exc}",
                    hint="check the catalog URL and storage credentials",
                ) from exc

    def _evolve(self, name: str, schema: pa.Schema) -> None:
        """Add the columns ``schema`` has and the stored table lacks (older catalogs)."""
        from deltalake.schema import Field

        table = self._table(name)
        present = {field.name for field in table.schema().fields}
        missing = [field for field in schema if field.name not in present]
        if missing:
            logger.info("catalog table %s: adding columns %s", name, [f.name for f in missing])
            table.alter.add_columns([Field.from_arrow(field) for field in missing])
            table.update_incremental()

    def _table(self, name: str) -> Any:
        """The table's ``DeltaTable``, kept open and brought up to date (cheap log tail read)."""
        from deltalake import DeltaTable

        table = self._tables.get(name)
        try:
            if table is None:
                table = DeltaTable(table_url(self.url, name), storage_options=self.storage_options)
                self._tables[name] = table
            else:
                table.update_incremental()
        except OSError as exc:  # object store down or stalled (after delta-rs' retries)
            raise CatalogError(
                f"catalog table {name!r} cannot be read: {type(exc).__name__}",
                code="catalog_unreachable",
                hint="check the catalog URL, the endpoint and the network, then run again",
            ) from exc
        return table

    def upsert(
        self,
        name: str,
        rows: pa.Table | Iterable[Mapping[str, Any]],
        *,
        run_id: str,
        assume_new: bool = False,
    ) -> int | None:
        """Upsert ``rows`` into table ``name`` on its keys; return the new table version.

        Rows whose keys exist replace the old rows, in one Delta commit. ``assume_new=True``
        appends instead, for rows whose keys the caller knows are absent (much cheaper on
        large tables). Returns None when ``rows`` is empty.

        Notes
        -----
        The upsert is a predicate overwrite ("replace where the keys are"), not a Delta
        MERGE: delta-rs 1.6 writes the files a MERGE or DELETE rewrites with ``string_view``
        columns, on which pyarrow has no comparison kernels, so string filters on the
        catalog's pyarrow datasets would fail (delta-io/delta-rs#4579). Appends, predicate
        overwrites and compaction write plain strings.
        """
        from deltalake import CommitProperties, write_deltalake

        table, options = _prepare(name, rows)
        if table.num_rows == 0:
            return None
        keys = TABLE_KEYS[name]
        options["commit_properties"] = CommitProperties(custom_metadata={"voxlake.run_id": run_id})
        target = self._table(name)

        def write() -> None:
            if assume_new:
                write_deltalake(target, table, mode="append", **options)
            else:
                write_deltalake(
                    target,
                    table,
                    mode="overwrite",
                    predicate=_key_predicate(table, keys),
                    **options,
                )

        try:
            _retry_conflicts(target, write)
        except Exception as exc:
            raise CatalogError(f"commit to {name!r} failed: {exc}") from exc
        target.update_incremental()
        return int(target.version())

    def append_if_current(
        self, name: str, rows: pa.Table | Iterable[Mapping[str, Any]], *, run_id: str, version: int
    ) -> int | None:
        """Append ``rows`` to table ``name`` only if its latest version is still ``version``.

        Returns the new table version, or None when another writer committed to the table
        after ``version`` (nothing is then visible; the caller looks at what changed and
        tries again). This makes "check which keys are new, then append them" one atomic
        step across writers: two runs that both believe a key new cannot both commit it,
        so no table version ever holds a key twice.
        """
        from deltalake import CommitProperties, write_deltalake
        from deltalake.exceptions import CommitFailedError

        target = self._table(name)
        if int(target.version()) != version:
            return None
        table, options = _prepare(name, rows)
        # No retry: the commit lands as version + 1 or not at all (its data file, never
        # referenced, is left for vacuum).
        props = CommitProperties(custom_metadata={"voxlake.run_id": run_id}, max_commit_retries=0)
        try:
            write_deltalake(target, table, mode="append", commit_properties=props, **options)
        except CommitFailedError:
            target.update_incremental()
            return None
        except Exception as exc:
            raise CatalogError(f"commit to {name!r} failed: {exc}") from exc
        return version + 1

    def delete(self, name: str, predicate: str, *, run_id: str) -> None:
        """Delete rows matching a SQL ``predicate`` from table ``name``.

        Written as a predicate overwrite with no rows, for the reason given in
        :meth:`upsert`.
        """
        from deltalake import CommitProperties, write_deltalake

        props = CommitProperties(custom_metadata={"voxlake.run_id": run_id})
        target = self._table(name)
        try:
            _retry_conflicts(
                target,
                lambda: write_deltalake(
                    target,
                    SCHEMAS[name].empty_table(),
                    mode="overwrite",
                    predicate=predicate,
                    commit_properties=props,
                ),
            )
        except Exception as exc:
            raise CatalogError(f"delete from {name!r} failed: {exc}") from exc
        target.update_incremental()

    def delete_rows(self, name: str, rows: pa.Table, *, keys: tuple[str, ...], run_id: str) -> None:
        """Delete from table ``name`` exactly the rows whose ``keys`` values ``rows`` holds."""
        if rows.num_rows:
            self.delete(name, _key_predicate(rows, keys), run_id=run_id)

    def record_commit(self, *, run_id: str, operation: str) -> int:
        """Append a ``_commits`` row with every table's latest version; return the version.

        Catalog versions are positions in ``committed_at`` order, so concurrent writers
        are serialized: the row is written as a predicate overwrite of ``committed_at >
        <the latest>``, which matches no existing row but makes delta-rs refuse (and this
        method retry) when another writer recorded a commit in between. Rows then sit in
        ``committed_at`` order exactly as committed (a pinned version never changes
        meaning), and each row's table versions, read after the rows before it were
        committed, include everything those made visible.
        """
        from deltalake import CommitProperties, write_deltalake

        props = CommitProperties(custom_metadata={"voxlake.run_id": run_id})
        commits = self._table("_commits")

        def write() -> None:
            # _commits first, then the tables: whatever a row committed before this
            # snapshot made visible is in the versions read after it.
            last = _last_commit_time(commits)
            versions = {f"{name}_version": int(self._table(name).version()) for name in TABLES}
            # Strictly increasing even if this host's clock is behind the last writer's.
            now = dt.datetime.now(dt.UTC)
            if last is not None and now <= last:
                now = last + dt.timedelta(milliseconds=1)
            row = {"run_id": run_id, "operation": operation, "committed_at": now, **versions}
            after = (
                "committed_at IS NOT NULL"
                if last is None
                else f"committed_at > '{last.isoformat()}'"
            )
            write_deltalake(
                commits,
                pa.Table.from_pylist([row], schema=COMMITS_SCHEMA),
                mode="overwrite",
                predicate=after,
                commit_properties=props,
            )

        try:
            _retry_conflicts(commits, write)
        except Exception as exc:
            raise CatalogError(f"catalog commit failed: {exc}") from exc
        commits.update_incremental()
        version = _count_rows(commits)
        logger.debug("catalog commit %d (%s) for run %s", version, operation, run_id)
        return version

    def commit(
        self,
        changes: Mapping[str, pa.Table | list[dict[str, Any]]],
        *,
        run_id: str,
        operation: str,
        assume_new: Mapping[str, bool] | None = None,
    ) -> int | None:
        """Write several tables, then record one catalog commit. Returns the catalog version.

        Nothing is recorded (None returned) when every change is empty.
        """
        wrote = False
        for name, rows in changes.items():
            version = self.upsert(
                name, rows, run_id=run_id, assume_new=bool((assume_new or {}).get(name))
            )
            wrote = wrote or version is not None
        if not wrote:
            return None
        return self.record_commit(run_id=run_id, operation=operation)
