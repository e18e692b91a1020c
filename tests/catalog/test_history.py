"""`Catalog.history()` and `voxlake catalog history`: status, formats, vacuumed versions."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from voxlake.catalog import CatalogWriter, attach_labels, open_catalog, vacuum_catalog
from voxlake.cli import main
from voxlake.errors import CatalogError
from voxlake.keys import keyed_hash, volume_id_for

SECRET = "history-test-secret"
#: An ingest run id as `voxlake ingest` makes them (25 characters).
RUN_ID = "20261123T152149Z-0ca94020"


def volume(series: str, **extra) -> dict:
    key = keyed_hash(SECRET, "series", series)
    return {"volume_id": volume_id_for(key), "revision": "r1", "series_key": key,
            "modality": "CT", "nbytes": 1, **extra}  # fmt: skip


def run_row(status: str) -> dict:
    return {"run_id": RUN_ID, "status": status, "files_seen": 3, "volumes_written": 1,
            "failures": 0, "started_at": pd.Timestamp("2026-01-01", tz="UTC")}  # fmt: skip


@pytest.fixture
def catalog(tmp_path) -> str:
    """v1, v2: an ingest run; v3: labels; v4: a volume rebuilt outside any run."""
    writer = CatalogWriter(tmp_path / "cat")
    writer.commit({"runs": [run_row("running")]}, run_id=RUN_ID, operation="run start")
    writer.commit(
        {"volumes": [volume("1.2.3")], "runs": [run_row("completed")]},
        run_id=RUN_ID,
        operation="run completed",
    )
    attach_labels(
        writer.url, pd.DataFrame({"SeriesInstanceUID": ["1.2.3"], "sick": [1]}), secret=SECRET
    )
    writer.commit({"volumes": [volume("1.2.3", revision="r2")]}, run_id="fix", operation="t")
    return str(writer.url)


def history(*args: str, capsys) -> str:
    capsys.readouterr()
    main(["catalog", "history", *args])  # exits (SystemExit) only on an error
    return capsys.readouterr().out


def test_commits_outside_runs_have_no_status_and_counts_stay_integers(catalog, capsys):
    frame = open_catalog(catalog).history()
    assert frame["status"].tolist()[:2] == ["completed", "completed"]
    assert frame["status"].iloc[2:].isna().all()  # labels, a fix: no run, no status
    assert str(frame["files_seen"].dtype) == "Int64"
    table = history(catalog, capsys=capsys)
    assert "nan" not in table.lower() and "labels" in table


def test_history_formats_write_every_value_as_it_is(catalog, capsys):
    rows = json.loads(history(catalog, "--format", "json", capsys=capsys))
    assert [r["version"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["run_id"] == RUN_ID and rows[2]["status"] is None
    committed = open_catalog(catalog).history()["committed_at"]
    assert [pd.Timestamp(r["committed_at"]) for r in rows] == committed.tolist()  # every µs
    assert rows[0]["vacuumed"] is False
    csv = pd.read_csv(io.StringIO(history(catalog, "--format", "csv", capsys=capsys)))
    assert csv["run_id"].tolist()[:2] == [RUN_ID, RUN_ID]
    assert csv["status"].isna().tolist() == [False, False, True, True]
    with pytest.raises(SystemExit) as exited:
        main(["catalog", "history", catalog, "--format", "xml"])
    assert exited.value.code == 2


def test_an_80_column_table_shows_run_ids_whole(catalog, capsys, monkeypatch):
    from voxlake.cli._app import out

    monkeypatch.setattr(out, "_width", 80)
    table = history(catalog, capsys=capsys)
    assert max(len(line) for line in table.splitlines()) <= 80
    assert table.count(RUN_ID) == 2  # one line each: not cut, not folded


def test_versions_whose_files_a_vacuum_removed_are_marked(catalog, capsys):
    assert not open_catalog(catalog).history()["vacuumed"].any()  # never vacuumed
    vacuum_catalog(catalog, retention_hours=0)
    frame = open_catalog(catalog).history()
    # v2 and v3 read the volumes file the rebuild (v4) replaced; v1 had no volumes yet
    # and reads the runs file... which v2's merge replaced. Only v4 reads what is left.
    assert frame["vacuumed"].tolist() == [True, True, True, False]
    for version, gone in zip(frame["version"], frame["vacuumed"], strict=True):
        old = open_catalog(catalog, version=int(version))
        if gone:
            with pytest.raises(CatalogError) as info:
                old.sql("SELECT * FROM volumes, runs, labels")
            assert info.value.code == "version_vacuumed"
        else:
            old.sql("SELECT * FROM volumes, runs, labels")
    table = history(catalog, capsys=capsys)
    assert "3*" in table and "4*" not in table and "vacuum removed files" in table
    rows = json.loads(history(catalog, "--format", "json", capsys=capsys))
    assert [r["vacuumed"] for r in rows] == [True, True, True, False]


def test_versions_a_vacuum_left_whole_are_not_marked(tmp_path):
    """Appends never replace a file: after a vacuum every version still reads."""
    writer = CatalogWriter(tmp_path / "cat")
    writer.commit({"volumes": [volume("1.2.3")]}, run_id="a", operation="t")
    attach_labels(writer.url, pd.DataFrame({"SeriesInstanceUID": ["1.2.3"], "x": [1]}),
                  secret=SECRET)  # fmt: skip
    vacuum_catalog(writer.url, retention_hours=0)
    frame = open_catalog(writer.url).history()
    assert not frame["vacuumed"].any()
    assert len(open_catalog(writer.url, version=1).volumes) == 1
