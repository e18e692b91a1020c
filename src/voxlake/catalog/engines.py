"""How queries reach the Parquet files: pyarrow filters and the two DuckDB scan engines.

Both engines read the files of the pinned table versions and push ``WHERE`` filters and
column projections down to them; they differ in who reads the Parquet:

``"parquet"``
    DuckDB's own Parquet reader over the file list of the pinned version (``read_parquet``,
    footers parsed once per connection and cached): row groups are skipped by their
    statistics, filter columns are decoded first and the other columns only where rows
    match. The fastest for everything measured on a local catalog: aggregations and joins
    over ``instances`` several times less CPU than the arrow scan, lookups about the
    same. Remote catalogs are read through a registered fsspec filesystem.
``"arrow"``
    Each table is a pyarrow dataset built from the Delta log. Files whose Delta statistics
    exclude a filter are skipped without being opened, and row groups by their Parquet
    statistics; remote catalogs are read through delta-rs' object store. Scans of many
    rows cost several times more CPU than with ``"parquet"``, and long ``IN`` lists read
    every row group.
``"auto"`` (default)
    ``"parquet"`` for a local catalog, ``"arrow"`` for a remote one.

The benchmark (``benchmarks/catalog.py``, ``docs/performance.md``) measures both.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from voxlake.catalog.tables import TABLES, data_files, table_url

if TYPE_CHECKING:
    import pyarrow.compute as pc

    from voxlake.catalog.query import Catalog

__all__ = ["Engine", "duckdb_connection", "isin", "resolve_engine"]

Engine = Literal["auto", "arrow", "parquet"]

#: pyarrow (26) stops simplifying ``is_in`` against row-group statistics above about 50
#: values and then reads every row group; chunks of this size keep the pruning.
_ISIN_CHUNK = 32


def isin(column: str, values: Iterable[Any], *, type: pa.DataType | None = None) -> pc.Expression:
    """A membership filter on ``column`` that still skips row groups, however many values.

    ``pc.field(column).isin(values)`` with more than about 50 values makes pyarrow read
    every row group (it no longer checks the statistics); this splits the values into
    OR-ed sets of 32, each checked against the statistics.

    Examples
    --------
    >>> cat.dataset("instances").to_table(filter=isin("series_key", keys))  # doctest: +SKIP
    """
    import pyarrow.compute as pc

    distinct = sorted(set(values))
    value_type = type or pa.string()
    if not distinct:
        return pc.field(column).isin(pa.array([], value_type))
    parts = [
        pc.field(column).isin(pa.array(distinct[i : i + _ISIN_CHUNK], value_type))
        for i in range(0, len(distinct), _ISIN_CHUNK)
    ]
    return functools.reduce(operator.or_, parts)


def resolve_engine(catalog: Catalog, engine: Engine) -> Engine:
    """The engine ``"auto"`` stands for: ``"parquet"`` when local, ``"arrow"`` when remote."""
    if engine not in ("auto", "arrow", "parquet"):
        raise ValueError(f"engine must be 'auto', 'arrow' or 'parquet', not {engine!r}")
    if engine != "auto":
        return engine
    return "arrow" if _is_remote(catalog.url) else "parquet"


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def duckdb_connection(catalog: Catalog, engine: Engine = "auto") -> Any:
    """A DuckDB connection with every table of ``catalog`` registered as a view."""
    import duckdb

    engine = resolve_engine(catalog, engine)
    con = duckdb.connect()
    if engine == "arrow":
        for name in TABLES:
            con.register(name, catalog.dataset(name))
        return con
    _cache_parquet_metadata(con)
    if _is_remote(catalog.url):
        import fsspec

        from voxlake.catalog._io import fsspec_options

        protocol = catalog.url.split("://", 1)[0]
        con.register_filesystem(
            fsspec.filesystem(protocol, **(fsspec_options(catalog.storage_options) or {}))
        )
    for name in TABLES:
        files = (
            []
            if catalog.table_versions[name] is None
            else data_files(catalog.delta_table(name), table_url(catalog.url, name))
        )
        if not files:
            con.register(name, catalog.dataset(name))  # empty: keep the schema
            continue
        listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        # Files written before a column was added lack it: union_by_name reads it as null
        # there. It costs every query a schema pass over all files (Q2 and lookups took
        # 1.5 to 4x longer with it), so only mixed listings get it.
        options = "" if _same_columns(con, listing) else ", union_by_name = true"
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{listing}]{options})")
    return con


def _cache_parquet_metadata(con: Any) -> None:
    """Keep parsed Parquet footers across queries (files of a Delta version never change).

    Without it DuckDB re-reads and re-parses every footer on every query: 60 to 70 ms of a
    single-series lookup on a million-row catalog. The setting's name changed across DuckDB
    releases; the older one is tried where the newer one is unknown.
    """
    for setting in ("parquet_metadata_cache", "enable_object_cache"):
        if _set_if_known(con, setting, "true"):
            return


def _set_if_known(con: Any, setting: str, value: str) -> bool:
    """Set a DuckDB option; False where this DuckDB release does not know it."""
    import duckdb

    try:
        con.execute(f"SET {setting} = {value}")
    except duckdb.Error:
        return False
    return True


def _same_columns(con: Any, listing: str) -> bool:
    """Whether the listed Parquet files all have the same top-level columns.

    Reads the footers through DuckDB, which caches them for the queries that follow.
    """
    rows = con.execute(
        f"SELECT file_name, name, num_children FROM parquet_schema([{listing}])"
    ).fetchall()
    columns: dict[str, list[str]] = {}
    pending: dict[str, list[int]] = {}  # per file: children left to visit at each depth
    for file_name, name, children in rows:
        stack = pending.setdefault(file_name, [])
        if not stack and file_name not in columns:  # the root element
            columns[file_name] = []
            stack.append(int(children or 0))
            continue
        while stack and stack[-1] == 0:
            stack.pop()
        if len(stack) == 1:
            columns[file_name].append(name)
        if stack:
            stack[-1] -= 1
        if children:
            stack.append(int(children))
    return len({tuple(names) for names in columns.values()}) <= 1
