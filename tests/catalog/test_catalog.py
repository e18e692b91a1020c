"""The catalog: Delta commits, version pinning, time travel, SQL, labels, selection."""

from __future__ import annotations

import datetime as dt
import time

import pandas as pd
import pyarrow.compute as pc
import pytest

from voxlake.catalog import CatalogWriter, attach_labels, open_catalog
from voxlake.catalog.schema import SCHEMAS, render_schema_markdown
from voxlake.errors import CatalogError, ConfigError
from voxlake.keys import keyed_hash, volume_id_for

SECRET = "catalog-test-secret"


def volume(series_uid: str, **extra):
    series_key = keyed_hash(SECRET, "series", series_uid)
    return {
        "volume_id": volume_id_for(series_key),
        "revision": "r1",
        "series_key": series_key,
        "patient_key": keyed_hash(SECRET, "patient", "P-" + series_uid),
        "modality": "CT",
        "nbytes": 100,
        "shape": [2, 3, 4],
        **extra,
    }


@pytest.fixture
def writer(tmp_path):
    return CatalogWriter(tmp_path / "cat")


def test_every_column_has_a_description_stored_with_the_table(writer):
    for name, schema in SCHEMAS.items():
        for field in schema:
            assert field.metadata and field.metadata[b"description"], (name, field.name)
    from deltalake import DeltaTable

    stored = DeltaTable(f"{writer.url}/volumes").schema().to_arrow()
    assert "description" in str(stored)
    doc = render_schema_markdown()
    assert all(f"`{f.name}`" in doc for f in SCHEMAS["instances"])


def test_merge_on_keys_never_duplicates(writer):
    writer.commit({"volumes": [volume("1.2.3")]}, run_id="a", operation="t")
    writer.commit(
        {"volumes": [volume("1.2.3", modality="MR"), volume("1.2.4")]}, run_id="b", operation="t"
    )
    frame = open_catalog(writer.url).volumes
    assert len(frame) == 2
    assert (
        frame.set_index("series_key").loc[keyed_hash(SECRET, "series", "1.2.3"), "modality"] == "MR"
    )


def test_versions_pin_a_snapshot_and_time_travel(writer):
    assert writer.commit({"volumes": []}, run_id="x", operation="noop") is None
    v1 = writer.commit({"volumes": [volume("1")]}, run_id="a", operation="t")
    between = dt.datetime.now(dt.UTC)
    time.sleep(0.01)
    v2 = writer.commit({"volumes": [volume("2")]}, run_id="b", operation="t")
    assert (v1, v2) == (1, 2)
    assert len(open_catalog(writer.url).volumes) == 2
    assert len(open_catalog(writer.url, version=1).volumes) == 1
    assert len(open_catalog(writer.url, as_of=between).volumes) == 1
    assert open_catalog(writer.url, as_of=between).version == 1
    with pytest.raises(CatalogError) as info:
        open_catalog(writer.url, version=9)
    assert info.value.code == "no_such_version"
    history = open_catalog(writer.url).history()
    assert list(history.version) == [1, 2]
    assert list(history.run_id) == ["a", "b"]


def test_sql_and_pushdown(writer):
    writer.commit(
        {"volumes": [volume(str(i), n_slices=i) for i in range(10)]}, run_id="a", operation="t"
    )
    cat = open_catalog(writer.url)
    frame = cat.sql("SELECT count(*) AS n FROM volumes WHERE n_slices >= 5")
    assert int(frame.n[0]) == 5
    table = cat.dataset("volumes").to_table(filter=pc.field("n_slices") < 3, columns=["n_slices"])
    assert sorted(table.column(0).to_pylist()) == [0, 1, 2]
    with pytest.raises(CatalogError):
        cat.sql("SELECT nope FROM volumes")
    assert "voxlake catalog" in cat._repr_html_()
    assert cat.to_dask("volumes").compute().shape[0] == 10


def test_missing_catalog_is_a_clear_error(tmp_path):
    with pytest.raises(CatalogError) as info:
        open_catalog(tmp_path / "nothing")
    assert info.value.code == "catalog_not_found" and info.value.hint


def test_labels_attach_by_original_identifier_without_storing_it(writer, tmp_path):
    writer.commit(
        {"volumes": [volume("1.2.3"), volume("1.2.4"), volume("1.2.5")]}, run_id="a", operation="t"
    )
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"SeriesInstanceUID": ["1.2.3", "1.2.4", "9.9"], "label": [1, 0, 1]}).to_csv(
        csv, index=False
    )
    attach_labels(writer.url, csv, secret=SECRET)
    cat = open_catalog(writer.url)
    assert "1.2.3" not in cat.labels.to_json(date_format="iso")
    selection = cat.training_selection()
    assert len(selection) == 2
    by_key = dict(zip(selection.series_key, selection.label, strict=True))
    assert by_key[keyed_hash(SECRET, "series", "1.2.3")] == 1.0
    assert by_key[keyed_hash(SECRET, "series", "1.2.4")] == 0.0
    assert selection.attrs["catalog_version"] == cat.version
    # Patient-level labels apply to every volume of the patient.
    attach_labels(
        writer.url,
        pd.DataFrame({"PatientID": ["P-1.2.5"], "sick": [1]}),
        secret=SECRET,
        on="PatientID",
    )
    assert len(open_catalog(writer.url).training_selection("sick")) == 1
    with pytest.raises(ConfigError):
        attach_labels(writer.url, csv, secret=SECRET, on="PatientName")
