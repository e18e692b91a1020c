"""The catalog: Delta commits, version pinning, time travel, SQL, labels, selection."""

from __future__ import annotations

import datetime as dt
import time

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from voxlake.catalog import CatalogWriter, attach_labels, isin, open_catalog
from voxlake.catalog.schema import SCHEMAS, render_schema_markdown
from voxlake.errors import CatalogError, ConfigError, SourceError
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


@pytest.mark.parametrize("folder", ["my catalog", "50% of it", "café"])
def test_a_catalog_whose_path_needs_escaping_reads_every_way(tmp_path, folder):
    """delta-rs percent-encodes the file URIs it lists (``my%20catalog``): every reader that
    opens the files itself (DuckDB's Parquet reader, dask, a concurrent writer's poll)
    must still find them."""
    from voxlake.catalog.concurrent import ForeignRows

    url = str(tmp_path / folder / "cat")
    writer = CatalogWriter(url)
    writer.commit({"volumes": [volume(str(i)) for i in range(3)]}, run_id="a", operation="t")
    first = open_catalog(url).table_versions["volumes"]
    poll = ForeignRows(
        url, "volumes", run_id="b", key="volume_id", columns=("revision",), version=first
    )
    writer.commit({"volumes": [volume(str(i)) for i in range(3, 5)]}, run_id="a", operation="t")
    cat = open_catalog(url)
    for engine in ("parquet", "arrow"):
        assert int(cat.sql("SELECT count(*) AS n FROM volumes", engine=engine).n[0]) == 5
    assert cat.to_dask("volumes").compute().shape[0] == 5
    assert len(poll.poll()) == 2  # the other run's rows since, read from the files it added


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


def test_labels_by_accession_number_join_through_the_study(writer):
    study = {n: keyed_hash(SECRET, "study", f"1.9.{n}") for n in range(3)}
    accession = {n: keyed_hash(SECRET, "accession", f"ACC-{n}") for n in range(3)}
    instances = [
        {"url": f"/f{n}.dcm", "study_key": study[n], "accession_key": accession[n]}
        for n in range(3)
    ]
    volumes = [volume(f"1.9.{n}.1", study_key=study[n]) for n in range(3)]
    writer.commit({"instances": instances, "volumes": volumes}, run_id="a", operation="t")
    # Accession labels can be attached before their study is ingested (ACC-9): they wait.
    labels = pd.DataFrame({"AccessionNumber": ["ACC-0", "ACC-1", "ACC-9"], "sick": [1, 0, 1]})
    attach_labels(writer.url, labels, secret=SECRET, on="AccessionNumber")
    cat = open_catalog(writer.url)
    stored = cat.labels
    assert set(stored.key_kind) == {"accession"}
    assert "ACC-" not in stored.to_json(date_format="iso")
    selection = cat.training_selection("sick").set_index("study_key")
    assert dict(selection.sick) == {study[0]: 1.0, study[1]: 0.0}
    # A series label overrides the study's accession label.
    attach_labels(
        writer.url,
        pd.DataFrame({"SeriesInstanceUID": ["1.9.0.1"], "sick": [0]}),
        secret=SECRET,
    )
    selection = open_catalog(writer.url).training_selection("sick").set_index("study_key")
    assert selection.loc[study[0], "sick"] == 0.0


def test_conflicting_labels_are_refused_and_exact_duplicates_kept_once(writer, tmp_path):
    writer.commit({"volumes": [volume("1.2.3"), volume("1.2.4")]}, run_id="a", operation="t")
    version = open_catalog(writer.url).version
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "PatientID,label,grade\n"
        "P-1.2.3,1,2\n"
        "P-1.2.4,1,3\n"
        " P-1.2.3,0,2\n"  # the same patient (identifiers are stripped), another label
        "P-9,1,1\n"
        "P-9,1,4\n"  # another patient, another grade
        "P-1.2.4,1,3\n"  # an exact duplicate: fine
    )
    with pytest.raises(ConfigError) as info:
        attach_labels(writer.url, csv, secret=SECRET, on="PatientID")
    error = info.value
    assert error.code == "conflicting_labels"
    assert error.message.startswith("2 PatientID") and "label, grade" in error.message
    assert "'P-1.2.3'" in error.message  # one example, as written in the CSV
    text = f"{error.message} {error.hint}"
    assert "P-9" not in text and "P-1.2.4" not in text  # nor other rows
    assert keyed_hash(SECRET, "patient", "P-1.2.3") not in text
    assert open_catalog(writer.url).version == version  # nothing attached

    csv.write_text("PatientID,label\nP-1.2.3,1\nP-1.2.4,0\nP-1.2.3,1\n")
    attach_labels(writer.url, csv, secret=SECRET, on="PatientID")
    stored = open_catalog(writer.url).labels
    assert len(stored) == 2 and stored.key.is_unique


def test_a_missing_label_csv_is_a_coded_error(writer, tmp_path):
    with pytest.raises(SourceError) as info:
        attach_labels(writer.url, tmp_path / "nope.csv", secret=SECRET)
    assert info.value.code == "labels_not_found" and "nope.csv" in info.value.message


def test_match_labels_counts_keys_with_and_without_volumes(writer):
    from voxlake.catalog.labels import LabelMatches, match_labels

    study = keyed_hash(SECRET, "study", "1.9")
    instances = [{"url": "/f.dcm", "study_key": study,
                  "accession_key": keyed_hash(SECRET, "accession", "ACC-0")}]  # fmt: skip
    volumes = [volume("1.2.3", study_key=study), volume("1.2.4")]
    writer.commit({"instances": instances, "volumes": volumes}, run_id="a", operation="t")
    series = pd.DataFrame({"SeriesInstanceUID": ["1.2.3", "1.2.4", "9.9", "1.2.3"],
                           "label": [1, 0, 1, 1]})  # fmt: skip
    assert match_labels(writer.url, series, secret=SECRET) == LabelMatches(2, 1)
    assert match_labels(writer.url, series, secret="another") == LabelMatches(0, 3)
    accession = pd.DataFrame({"AccessionNumber": ["ACC-0", "ACC-9"], "sick": [1, 0]})
    assert match_labels(writer.url, accession, secret=SECRET, on="AccessionNumber") == LabelMatches(
        1, 1
    )


def test_string_filters_push_down_after_upserts_and_deletes(writer):
    # Rows rewritten by an upsert or a delete must stay filterable by pyarrow and DuckDB
    # (delta-rs MERGE/DELETE would rewrite them with string_view columns).
    writer.commit({"volumes": [volume(str(i)) for i in range(6)]}, run_id="a", operation="t")
    writer.commit(
        {"volumes": [volume("1", modality="MR"), volume("2", modality="MR")]},
        run_id="b",
        operation="t",
    )
    gone = keyed_hash(SECRET, "series", "3")
    writer.delete("volumes", f"series_key = '{gone}'", run_id="c")
    writer.record_commit(run_id="c", operation="delete")
    cat = open_catalog(writer.url)
    table = cat.dataset("volumes").to_table(
        filter=pc.field("modality") == "MR", columns=["series_key"]
    )
    assert sorted(table.column(0).to_pylist()) == sorted(
        keyed_hash(SECRET, "series", s) for s in ("1", "2")
    )
    assert int(cat.sql("SELECT count(*) AS n FROM volumes WHERE modality = 'CT'").n[0]) == 3
    assert gone not in set(cat.volumes.series_key)
    assert len(open_catalog(writer.url, version=1).volumes) == 6


def test_both_duckdb_engines_and_large_isin_filters_agree(writer):
    rows = [volume(str(i), n_slices=i, modality="CT" if i % 2 else "MR") for i in range(300)]
    writer.commit({"volumes": rows}, run_id="a", operation="t")
    writer.commit({"volumes": [volume("7", n_slices=700)]}, run_id="b", operation="t")
    cat = open_catalog(writer.url)
    query = (
        "SELECT modality, count(*) AS n, max(n_slices) AS top FROM volumes GROUP BY 1 ORDER BY 1"
    )
    arrow, parquet = cat.sql(query), cat.sql(query, engine="parquet")
    assert arrow.to_dict("records") == parquet.to_dict("records")
    assert dict(zip(arrow.modality, arrow.top, strict=True)) == {"CT": 700, "MR": 298}
    # Empty tables and older versions work with both engines.
    for engine in ("arrow", "parquet"):
        assert int(cat.sql("SELECT count(*) AS n FROM splits", engine=engine).n[0]) == 0
        old = open_catalog(writer.url, version=1)
        assert int(old.sql("SELECT max(n_slices) AS m FROM volumes", engine=engine).m[0]) == 299
    wanted = [keyed_hash(SECRET, "series", str(i)) for i in range(0, 300, 3)]  # 100 keys
    table = cat.dataset("volumes").to_table(
        filter=isin("series_key", wanted), columns=["series_key"]
    )
    assert sorted(table.column(0).to_pylist()) == sorted(wanted)
    assert cat.dataset("volumes").to_table(filter=isin("series_key", [])).num_rows == 0


def test_instances_are_clustered_so_lookups_read_few_row_groups(writer):
    from voxlake.catalog.tables import ROW_GROUP_ROWS

    n = 5 * ROW_GROUP_ROWS
    rows = pa.table(
        {
            "url": [f"/f{i}.dcm" for i in range(n)],
            "series_key": [f"{(i * 7919) % n:08d}" for i in range(n)],  # arrives unsorted
        }
    )
    table = pa.table(
        {f.name: rows[f.name] if f.name in rows.column_names else pa.nulls(n, f.type)
         for f in SCHEMAS["instances"]},
        schema=SCHEMAS["instances"],
    )  # fmt: skip
    writer.commit({"instances": table}, run_id="a", operation="t", assume_new={"instances": True})
    (fragment,) = open_catalog(writer.url).dataset("instances").get_fragments()
    assert fragment.num_row_groups == 5
    one_group = [f"{i:08d}" for i in range(10, 90)]  # 80 keys, all in the first row group
    assert fragment.subset(filter=isin("series_key", one_group)).num_row_groups == 1
    assert fragment.subset(filter=pc.field("series_key") == "00004100").num_row_groups == 1


def test_an_unknown_label_is_a_coded_error_listing_the_attached_ones(writer):
    writer.commit({"volumes": [volume("1.2.3")]}, run_id="a", operation="t")
    with pytest.raises(CatalogError) as info:
        open_catalog(writer.url).training_selection("sick")
    assert info.value.code == "no_such_label" and "attach-labels" in info.value.hint
    labels = pd.DataFrame({"SeriesInstanceUID": ["1.2.3"], "sick": [1], "grade": [2]})
    attach_labels(writer.url, labels, secret=SECRET)
    cat = open_catalog(writer.url)
    with pytest.raises(CatalogError) as info:
        cat.training_selection("nosuch")
    assert info.value.code == "no_such_label"
    assert "no label 'nosuch' in catalog version" in info.value.message
    assert "labels attached: grade, sick" in info.value.hint
    assert len(cat.training_selection("sick")) == 1
