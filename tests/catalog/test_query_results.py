"""What `Catalog.sql()` hands back: exact 128-bit integers and the SQL type of each column."""

from __future__ import annotations

import pytest

from voxlake.catalog import CatalogWriter, open_catalog
from voxlake.keys import keyed_hash, volume_id_for

BIG = 2**127 - 1  # the largest HUGEINT: float64 kept 16 of its 39 digits
UBIG = 2**128 - 1  # the largest UHUGEINT: DuckDB could not convert it at all


@pytest.fixture
def catalog(tmp_path) -> str:
    rows = []
    for n, slices in enumerate((40, 26)):
        key = keyed_hash("results-secret", "series", f"1.2.{n}")
        rows.append({"volume_id": volume_id_for(key), "revision": "r1", "series_key": key,
                     "modality": "CT", "nbytes": 1, "n_slices": slices})  # fmt: skip
    CatalogWriter(tmp_path / "cat").commit({"volumes": rows}, run_id="a", operation="t")
    return str(tmp_path / "cat")


@pytest.mark.parametrize("engine", ["parquet", "arrow"])
def test_128_bit_integers_come_back_exact(catalog, engine):
    frame = open_catalog(catalog).sql(
        f"SELECT sum(n_slices) AS slices, {BIG}::HUGEINT AS big, {UBIG}::UHUGEINT AS ubig,"
        " NULL::HUGEINT AS none, DATE '2024-01-02' AS day FROM volumes",
        engine=engine,
    )
    row = frame.iloc[0]
    assert str(frame["slices"].dtype) == "int64" and row["slices"] == 66  # not 66.0
    assert row["big"] == BIG and isinstance(row["big"], int)
    assert row["ubig"] == UBIG
    assert str(frame["none"].dtype) == "Int64" and frame["none"].isna().all()
    assert frame.attrs["sql_types"] == {
        "slices": "HUGEINT", "big": "HUGEINT", "ubig": "UHUGEINT", "none": "HUGEINT",
        "day": "DATE",
    }  # fmt: skip
    assert list(frame.columns) == ["slices", "big", "ubig", "none", "day"]


@pytest.mark.parametrize("engine", ["parquet", "arrow"])
def test_ordinary_results_keep_their_types(catalog, engine):
    frame = open_catalog(catalog).sql(
        "SELECT volume_id, n_slices FROM volumes ORDER BY 2", engine=engine
    )
    assert frame["n_slices"].tolist() == [26, 40]
    assert frame.attrs["sql_types"]["volume_id"] == "VARCHAR"
