"""Small I/O helpers shared by the catalog modules (fsspec options, Parquet files)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = ["fsspec_options", "read_parquet_file"]


def fsspec_options(delta_options: Mapping[str, str] | None) -> dict[str, Any] | None:
    """fsspec (s3fs) options equivalent to delta-rs storage options (None when local)."""
    opts = delta_options or {}
    if "AWS_ENDPOINT_URL" not in opts:
        return None
    return {
        "key": opts.get("AWS_ACCESS_KEY_ID"),
        "secret": opts.get("AWS_SECRET_ACCESS_KEY"),
        "client_kwargs": {
            "endpoint_url": opts["AWS_ENDPOINT_URL"],
            "region_name": opts.get("AWS_REGION", "us-east-1"),
        },
    }


def read_parquet_file(
    path: str, *, schema: pa.Schema, storage_options: dict[str, Any] | None
) -> pd.DataFrame:
    """Read one Parquet file of a Delta table, cast to the catalog schema."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, fs_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
    with fs.open(fs_path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        present = [n for n in schema.names if n in parquet.schema_arrow.names]
        table = parquet.read(columns=present)
    # Files written before a column was added to the schema lack it: it reads as null.
    columns = [
        table.column(f.name).cast(f.type) if f.name in present else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    frame: pd.DataFrame = pa.Table.from_arrays(columns, schema=schema).to_pandas()
    return frame
