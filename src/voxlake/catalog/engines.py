"""How queries reach the Parquet files: pyarrow filters and the two DuckDB scan engines.

Both engines read the files of the pinned table versions and push ``WHERE`` filters and
column projections down to them; they differ in who reads the Parquet:

``"arrow"`` (default)
    Each table is a pyarrow dataset built from the Delta log. Files whose Delta statistics
    exclude a filter are skipped without being opened, and row groups by their Parquet
    statistics: the fastest for selective lookups (one series), and it reads ``s3://``
    catalogs through delta-rs.
``"parquet"``
    DuckDB's own Parquet reader over the same file list (``read_parquet``, metadata
    cached): several times less CPU than the arrow scan on queries that read most rows
    (aggregations, joins over ``instances``), slower on selective lookups. Remote
    catalogs are read through a registered fsspec filesystem.

The benchmark (``benchmarks/catalog.py``, ``docs/performance.md``) measures both.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from voxlake.catalog.tables import TABLES

if TYPE_CHECKING:
    import pyarrow.compute as pc

    from voxlake.catalog.query import Catalog

__all__ = ["Engine", "duckdb_connection", "isin"]

Engine = Literal["arrow", "parquet"]

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


def duckdb_connection(catalog: Catalog, engine: Engine = "arrow") -> Any:
    """A DuckDB connection with every table of ``catalog`` registered as a view."""
    import duckdb

    con = duckdb.connect()
    if engine == "arrow":
        for name in TABLES:
            con.register(name, catalog.dataset(name))
        return con
    if engine != "parquet":
        raise ValueError(f"engine must be 'arrow' or 'parquet', not {engine!r}")
    con.execute("SET enable_object_cache = true")  # footers parsed once per connection
    remote = "://" in catalog.url and not catalog.url.startswith("file://")
    if remote:
        import fsspec

        from voxlake.catalog._io import fsspec_options

        protocol = catalog.url.split("://", 1)[0]
        con.register_filesystem(
            fsspec.filesystem(protocol, **(fsspec_options(catalog.storage_options) or {}))
        )
    for name in TABLES:
        files = (
            [] if catalog.table_versions[name] is None else catalog.delta_table(name).file_uris()
        )
        if not files:
            con.register(name, catalog.dataset(name))  # empty: keep the schema
            continue
        listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        # union_by_name: files written before a column was added read it as null.
        con.execute(
            f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{listing}], union_by_name = true)"
        )
    return con
