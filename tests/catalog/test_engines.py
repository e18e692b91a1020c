"""The DuckDB scan engines: which one ``"auto"`` picks, and what the Parquet views keep."""

from __future__ import annotations

import pyarrow as pa
import pytest

from voxlake.catalog import CatalogWriter, open_catalog
from voxlake.catalog.engines import duckdb_connection, resolve_engine
from voxlake.catalog.schema import SCHEMAS


def instances(urls: list[str], series: list[str]) -> pa.Table:
    n = len(urls)
    given = {"url": urls, "series_key": series, "modality": ["CT"] * n}
    return pa.table(
        {f.name: given.get(f.name, pa.nulls(n, f.type)) for f in SCHEMAS["instances"]},
        schema=SCHEMAS["instances"],
    )


@pytest.fixture
def catalog(tmp_path):
    writer = CatalogWriter(tmp_path / "cat")
    for batch in range(3):  # three files with the same columns
        urls = [f"/{batch}/{i}.dcm" for i in range(10)]
        writer.commit(
            {"instances": instances(urls, [f"s{batch}{i % 2}" for i in range(10)])},
            run_id=f"r{batch}",
            operation="headers",
            assume_new={"instances": True},
        )
    return open_catalog(tmp_path / "cat")


def test_auto_reads_local_catalogs_with_duckdbs_parquet_reader(catalog):
    assert resolve_engine(catalog, "auto") == "parquet"
    assert resolve_engine(catalog, "arrow") == "arrow"
    remote = type(catalog).__new__(type(catalog))
    remote.url = "s3://bucket/catalog"
    assert resolve_engine(remote, "auto") == "arrow"
    with pytest.raises(ValueError, match="engine"):
        resolve_engine(catalog, "sqlite")  # type: ignore[arg-type]
    query = "SELECT series_key, count(*) AS n FROM instances GROUP BY 1 ORDER BY 1"
    default = catalog.sql(query)
    assert set(catalog._duckdb) == {"parquet"}
    assert default.equals(catalog.sql(query, engine="arrow"))
    assert default.n.tolist() == [5] * 6


def test_parquet_views_cache_footers_and_skip_the_schema_union(catalog):
    con = duckdb_connection(catalog, "parquet")
    cached = con.execute("SELECT current_setting('parquet_metadata_cache')").fetchone()
    assert cached == (True,)
    plan = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'instances'").fetchone()
    assert plan is not None and "union_by_name" not in plan[0]
    rows = con.execute("SELECT url FROM instances WHERE series_key = 's11' ORDER BY url").fetchall()
    assert [r[0] for r in rows] == [f"/1/{i}.dcm" for i in (1, 3, 5, 7, 9)]


def test_commit_files_carry_a_bloom_filter_on_series_key(catalog):
    import duckdb

    files = catalog.delta_table("instances").file_uris()
    listing = ", ".join(f"'{f}'" for f in files)
    rows = duckdb.sql(
        "SELECT path_in_schema, encodings, bloom_filter_length"
        f" FROM parquet_metadata([{listing}]) WHERE path_in_schema IN ('series_key', 'url')"
    ).fetchall()
    assert len(rows) == 2 * len(files)
    for column, encodings, bloom in rows:
        assert (bloom or 0) > 0 if column == "series_key" else not bloom
        assert "DICTIONARY" in encodings  # the filter does not cost the dictionary
