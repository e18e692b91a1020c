"""optimize and vacuum on real Delta tables and a real Zarr store."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from voxlake.catalog import CatalogWriter, open_catalog, optimize_catalog, vacuum_catalog
from voxlake.cli import main
from voxlake.errors import CatalogError
from voxlake.keys import keyed_hash, volume_id_for

SECRET = "maintenance-test-secret"
OLD = time.time() - 10 * 24 * 3600


def volume_id(name: str) -> str:
    return volume_id_for(keyed_hash(SECRET, "series", name))


def write_group(store: Path, path: str, *, old: bool = True) -> Path:
    group = zarr.open_group(str(store / path), mode="w")
    group.create_array("0", data=np.arange(8, dtype=np.int16).reshape(2, 2, 2))
    folder = store / path
    if old:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                os.utime(os.path.join(root, name), (OLD, OLD))
        os.utime(folder, (OLD, OLD))
    return folder


def row(name: str, revision: str, store: Path) -> dict:
    vid = volume_id(name)
    return {
        "volume_id": vid,
        "revision": revision,
        "series_key": keyed_hash(SECRET, "series", name),
        "store_url": str(store),
        "store_path": f"{vid}/{revision}",
        "modality": "CT",
    }


@pytest.fixture
def catalog_and_store(tmp_path):
    """v1: volumes a (revision 1) and b; v2: a rebuilt (revision 2). Plus an orphan
    revision of c from a killed run and a staging leftover, all ten days old."""
    store, url = tmp_path / "volumes.zarr", str(tmp_path / "catalog")
    r1, r2 = "aa" * 8, "bb" * 8
    for path in (f"{volume_id('a')}/{r1}", f"{volume_id('a')}/{r2}", f"{volume_id('b')}/{r1}"):
        write_group(store, path)
    orphan = write_group(store, f"{volume_id('c')}/{r1}")
    staging = store / ".staging" / uuid.uuid4().hex
    staging.mkdir(parents=True)
    os.utime(staging, (OLD, OLD))
    writer = CatalogWriter(url)
    writer.commit(
        {"volumes": [row("a", r1, store), row("b", r1, store)]}, run_id="1", operation="v"
    )
    writer.commit({"volumes": [row("a", r2, store)]}, run_id="2", operation="v")
    paths = {
        "a1": f"{volume_id('a')}/{r1}",
        "a2": f"{volume_id('a')}/{r2}",
        "b1": f"{volume_id('b')}/{r1}",
        "orphan": orphan,
        "staging": staging,
    }
    return url, store, paths


def groups(store: Path) -> set[str]:
    return {
        f"{d.name}/{g.name}"
        for d in store.iterdir()
        if d.is_dir() and d.name != ".staging"
        for g in d.iterdir()
    }


def test_dry_run_lists_but_deletes_nothing(catalog_and_store):
    url, store, paths = catalog_and_store
    before = groups(store)
    files_before = sorted(p for p in Path(url).rglob("*") if p.is_file())
    report = vacuum_catalog(url, store=str(store), retention_hours=0, dry_run=True)
    assert report.dry_run
    assert f"{volume_id('c')}/{'aa' * 8}" in report.orphan_groups
    assert report.staging == [f".staging/{paths['staging'].name}"]
    assert report.table_files["volumes"], "the superseded volumes file is listed"
    assert groups(store) == before and paths["staging"].exists()
    assert sorted(p for p in Path(url).rglob("*") if p.is_file()) == files_before


def test_vacuum_keeps_what_retained_versions_reference(catalog_and_store):
    url, store, paths = catalog_and_store
    young = write_group(store, f"{volume_id('d')}/{'cc' * 8}", old=False)  # a running ingest
    report = vacuum_catalog(url, store=str(store), retention_hours=1)
    # Both catalog versions are younger than an hour: a1 (pinned by version 1) stays.
    assert report.oldest_kept_version == 1
    assert report.orphan_groups == [f"{volume_id('c')}/{'aa' * 8}"]
    assert not paths["orphan"].exists() and not paths["orphan"].parent.exists()
    assert not paths["staging"].exists()
    assert young.exists()
    assert {paths["a1"], paths["a2"], paths["b1"]} <= groups(store)
    old = open_catalog(url, version=1).volumes.set_index("volume_id")
    assert old.loc[volume_id("a"), "store_path"] == paths["a1"]
    assert zarr.open_array(str(store / paths["a1"] / "0"), mode="r")[:].sum() == 28


def test_zero_retention_keeps_only_the_latest_version(catalog_and_store):
    url, store, paths = catalog_and_store
    report = vacuum_catalog(url, store=str(store), retention_hours=0)
    assert report.oldest_kept_version == 2
    assert paths["a1"] in report.orphan_groups
    assert groups(store) == {paths["a2"], paths["b1"]}
    assert report.table_files["volumes"]
    latest = open_catalog(url)
    assert sorted(latest.volumes.store_path) == sorted([paths["a2"], paths["b1"]])
    assert int(latest.sql("SELECT count(*) AS n FROM volumes WHERE modality = 'CT'").n[0]) == 2


def test_a_vacuumed_version_says_so_and_the_cli_exits_2(catalog_and_store, capsys):
    """Version 1 after a zero-retention vacuum: reading it raised delta-rs's or DuckDB's
    file-not-found (exit 1, a raw object-store message); now one coded error, every way
    in, with the latest version as the way out."""
    url, store, _ = catalog_and_store
    vacuum_catalog(url, store=str(store), retention_hours=0)
    old = open_catalog(url, version=1)
    reads = {
        "pandas": lambda: old.volumes,
        "parquet SQL": lambda: old.sql("SELECT count(*) FROM volumes", engine="parquet"),
        "arrow SQL": lambda: old.sql("SELECT count(*) FROM volumes", engine="arrow"),
        "summary": old.summary,
    }
    for way, read in reads.items():
        with pytest.raises(CatalogError, match="version 1 were removed by a vacuum") as info:
            read()
        assert info.value.code == "version_vacuumed", way
        assert "latest (2)" in info.value.hint
    query = "SELECT count(*) FROM volumes"
    for command in (
        ["catalog", "show", url, "--version", "1"],
        ["catalog", "query", url, query, "--version", "1"],
    ):
        with pytest.raises(SystemExit) as exited:
            main(command)
        assert exited.value.code == 2
        assert "[version_vacuumed]" in capsys.readouterr().err
    assert len(open_catalog(url, version=2).volumes) == 2  # the kept version reads


def test_vacuum_refuses_a_store_the_catalog_does_not_use(catalog_and_store, tmp_path):
    url, _, _ = catalog_and_store
    other = tmp_path / "other.zarr"
    write_group(other, f"{volume_id('x')}/{'dd' * 8}")
    with pytest.raises(CatalogError) as info:
        vacuum_catalog(url, store=str(other), retention_hours=0)
    assert info.value.code == "store_mismatch"
    assert groups(other) == {f"{volume_id('x')}/{'dd' * 8}"}


def test_optimize_compacts_and_keeps_rows_and_versions(tmp_path, capsys):
    url = str(tmp_path / "catalog")
    writer = CatalogWriter(url)
    for i in range(6):
        writer.commit(
            {"volumes": [row(str(i), "ab" * 8, tmp_path)]}, run_id=str(i), operation="volumes"
        )
    report = optimize_catalog(url)
    assert report.files_before["volumes"] == 6 and report.files_after["volumes"] == 1
    assert report.files_before["_commits"] == 6 and report.files_after["_commits"] == 1
    assert report.catalog_version == 7
    cat = open_catalog(url)
    assert cat.version == 7 and len(cat.volumes) == 6
    assert len(cat.delta_table("volumes").file_uris()) == 1
    assert int(cat.sql("SELECT count(*) AS n FROM volumes WHERE modality = 'CT'").n[0]) == 6
    assert len(open_catalog(url, version=3).volumes) == 3  # older versions until vacuum
    assert list(cat.history().operation)[-1] == "optimize"
    main(["catalog", "optimize", url])
    text = capsys.readouterr().out
    assert "volumes" in text and "catalog version 8" in text


def test_cli_vacuum_dry_run(catalog_and_store, capsys):
    url, store, paths = catalog_and_store
    main(["catalog", "vacuum", url, "--store", str(store), "--retention-hours", "0", "--dry-run"])
    text = capsys.readouterr().out
    assert "would remove" in text and "1 staging leftovers" in text
    assert paths["orphan"].exists() and paths["staging"].exists()
