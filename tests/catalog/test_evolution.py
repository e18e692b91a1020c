"""Catalogs written before a table or column existed still open, read and accept commits."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from voxlake.catalog import CatalogWriter, open_catalog
from voxlake.catalog.schema import SCHEMAS
from voxlake.catalog.tables import COMMITS_SCHEMA, rows_to_table

OLD_TABLES = ("instances", "volumes", "failures", "runs", "labels")
NEW_INSTANCE_COLUMN = "pulse_sequence_name"


def make_old_catalog(root: str) -> None:
    """A catalog as the first release wrote it: no ``splits`` table, no new columns."""
    old_instances = SCHEMAS["instances"].remove(
        SCHEMAS["instances"].get_field_index(NEW_INSTANCE_COLUMN)
    )
    schemas = {name: SCHEMAS[name] for name in OLD_TABLES} | {"instances": old_instances}
    for name, schema in schemas.items():
        DeltaTable.create(f"{root}/{name}", schema)
    rows = rows_to_table("instances", [{"url": "/a.dcm", "modality": "CT"}])
    write_deltalake(f"{root}/instances", rows.drop_columns([NEW_INSTANCE_COLUMN]), mode="append")
    commits = pa.schema([f for f in COMMITS_SCHEMA if f.name != "splits_version"])
    DeltaTable.create(f"{root}/_commits", commits)
    row = {"run_id": "old", "operation": "headers", "committed_at": dt.datetime.now(dt.UTC)}
    row |= {f"{name}_version": 0 for name in OLD_TABLES} | {"instances_version": 1}
    write_deltalake(f"{root}/_commits", pa.Table.from_pylist([row], schema=commits), mode="append")


def test_old_catalog_reads_with_the_new_code(tmp_path):
    root = str(tmp_path / "cat")
    make_old_catalog(root)
    cat = open_catalog(root)
    assert cat.version == 1 and cat.table_versions["splits"] is None
    assert cat.splits.empty and list(cat.splits.columns) == SCHEMAS["splits"].names
    assert int(cat.sql("SELECT count(*) AS n FROM splits").n[0]) == 0
    assert len(cat.instances) == 1
    assert cat.to_dask("splits").compute().empty


def test_writer_evolves_an_old_catalog_and_old_versions_stay_readable(tmp_path):
    root = str(tmp_path / "cat")
    make_old_catalog(root)
    writer = CatalogWriter(root)  # adds the splits table and the missing columns
    stored = {f.name for f in DeltaTable(f"{root}/instances").schema().fields}
    assert NEW_INSTANCE_COLUMN in stored
    assert "splits_version" in {f.name for f in DeltaTable(f"{root}/_commits").schema().fields}
    version = writer.commit(
        {"instances": [{"url": "/b.dcm", "modality": "MR", NEW_INSTANCE_COLUMN: "tse"}]},
        run_id="new",
        operation="headers",
    )
    assert version == 2
    new = open_catalog(root)
    assert new.table_versions["splits"] == 0
    frame = new.instances.set_index("url")
    assert frame.loc["/b.dcm", NEW_INSTANCE_COLUMN] == "tse"
    assert pd.isna(frame.loc["/a.dcm", NEW_INSTANCE_COLUMN])
    old = open_catalog(root, version=1)
    assert list(old.instances.url) == ["/a.dcm"]
    assert old.table_versions["splits"] is None
    # Beyond-memory reads fill the column the old files lack with nulls.
    dask_frame = new.to_dask("instances", columns=["url", NEW_INSTANCE_COLUMN]).compute()
    assert sorted(dask_frame.url) == ["/a.dcm", "/b.dcm"]
    assert list(new.history().version) == [1, 2]
    # So does SQL through both engines (DuckDB's reader unions the files by name).
    for engine in ("arrow", "parquet"):
        rows = new.sql(
            f"SELECT url, {NEW_INSTANCE_COLUMN} AS v FROM instances ORDER BY url", engine=engine
        )
        assert rows.url.tolist() == ["/a.dcm", "/b.dcm"]
        assert pd.isna(rows.v[0]) and rows.v[1] == "tse"
