"""Concurrent writers of one catalog and store: real processes, and the races replayed.

Killing a worker or the driver mid-run is covered by tests/ingest/test_faults.py.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from voxlake.catalog import CatalogWriter, open_catalog
from voxlake.catalog.concurrent import ForeignRows
from voxlake.catalog.tables import table_url
from voxlake.keys import keyed_hash
from voxlake.volumes import read_volume

from ..conftest import SECRET

pytestmark = pytest.mark.integration

DRIVER = textwrap.dedent(
    """
    import sys
    from voxlake.config import IngestConfig
    from voxlake.ingest import ingest

    if __name__ == "__main__":
        catalog, store, scheduler, secret, *sources = sys.argv[1:]
        report = ingest(sources, catalog=catalog, store=store,
                        config=IngestConfig(secret=secret, scheduler=scheduler, batch_size=8))
        print(report.status, report.instances, report.volumes_written)
    """
)


def test_two_ingest_processes_on_one_catalog_lose_nothing_and_duplicate_nothing(
    tmp_path, tiny_sample, dask_client
):
    """Both crawl the same archive (fully overlapping work) plus one folder of their own,
    into a catalog and store neither has created yet, at the same time."""
    from voxlake.testing.hostile import spec_for
    from voxlake.testing.synthetic import write_series

    own = {name: write_series(spec_for(name), tmp_path / name) for name in ("only-a", "only-b")}
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    catalog, store = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    scheduler = dask_client.scheduler.address
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                catalog,
                store,
                scheduler,
                SECRET,
                str(tiny_sample.root / "dicom"),
                str(tmp_path / name),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in own
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert out.split()[0] == "completed"
    cat = open_catalog(catalog)
    files = sum(len(s.files) for s in tiny_sample.series) + sum(len(w.files) for w in own.values())
    assert len(cat.instances) == files and cat.instances.url.is_unique
    series = [*tiny_sample.series, *own.values()]
    assert len(cat.volumes) == len(series) and cat.volumes.volume_id.is_unique
    assert len(cat.failures) == 0
    assert sorted(cat.runs.status) == ["completed", "completed"]
    by_series = cat.volumes.set_index("series_key")
    for written in series:
        row = by_series.loc[keyed_hash(SECRET, "series", written.spec.series_instance_uid)]
        data, attrs = read_volume(row.store_url, row.store_path)
        assert attrs["complete"] and np.array_equal(data, written.expected_volume())
    # Every catalog version opens and sees no less than the one before it.
    history = cat.history()
    for column in [c for c in history.columns if c.endswith("_version")]:
        versions = history[column].dropna().to_numpy()
        assert np.all(np.diff(versions) >= 0), column
    for version in range(1, cat.version + 1):
        pinned = open_catalog(catalog, version=version)
        assert pinned.instances.url.is_unique and pinned.volumes.volume_id.is_unique


def _rows(urls, run_id):
    return [
        {"url": u, "size": 1, "mtime": 2.0, "content_hash": "h", "run_id": run_id} for u in urls
    ]


def _writers(tmp_path):
    url = str(tmp_path / "cat")
    a, b = CatalogWriter(url), CatalogWriter(url)
    version = int(a._table("instances").version())
    guard = {
        run: ForeignRows(
            url,
            "instances",
            run_id=run,
            key="url",
            columns=("url", "size", "mtime"),
            version=version,
        )
        for run in ("run-a", "run-b")
    }
    return url, a, b, guard


def test_rows_another_run_committed_before_the_check_are_seen_and_merged(tmp_path):
    _, a, b, guard = _writers(tmp_path)
    b.upsert("instances", _rows(["/x/1", "/x/2"], "run-b"), run_id="run-b", assume_new=True)
    seen = guard["run-a"].poll()
    assert sorted(seen.url) == ["/x/1", "/x/2"] and set(seen.run_id) == {"run-b"}
    assert guard["run-a"].poll().empty  # nothing new since
    a.upsert("instances", _rows(["/x/3"], "run-a"), run_id="run-a", assume_new=True)
    assert guard["run-a"].poll().empty  # its own commits are not foreign


def test_an_append_race_commits_the_file_exactly_once(tmp_path):
    """Both runs looked at the same version and both believe /x/1 new. The first append
    lands; the second is refused (nothing of it visible), and after looking again the
    second run finds /x/1 foreign and appends only what is still new."""
    from deltalake import DeltaTable

    url, a, b, guard = _writers(tmp_path)
    assert guard["run-a"].poll().empty and guard["run-b"].poll().empty
    start = guard["run-a"].version
    assert guard["run-b"].version == start
    first = a.append_if_current(
        "instances", _rows(["/x/1", "/x/run-a"], "run-a"), run_id="run-a", version=start
    )
    assert first == start + 1
    refused = b.append_if_current(
        "instances", _rows(["/x/1", "/x/run-b"], "run-b"), run_id="run-b", version=start
    )
    assert refused is None
    assert DeltaTable(table_url(url, "instances")).version() == start + 1  # nothing landed
    seen = guard["run-b"].poll()
    assert sorted(seen.url) == ["/x/1", "/x/run-a"]
    still_new = [u for u in ("/x/1", "/x/run-b") if u not in set(seen.url)]
    assert still_new == ["/x/run-b"]
    second = b.append_if_current(
        "instances", _rows(still_new, "run-b"), run_id="run-b", version=guard["run-b"].version
    )
    assert second == start + 2
    for version in range(start, start + 3):  # every version holds each file at most once
        urls = DeltaTable(table_url(url, "instances"), version=version).to_pandas().url
        assert urls.is_unique, version
    rows = DeltaTable(table_url(url, "instances")).to_pyarrow_table().to_pylist()
    assert sorted((r["url"], r["run_id"]) for r in rows) == [
        ("/x/1", "run-a"), ("/x/run-a", "run-a"), ("/x/run-b", "run-b")
    ]  # fmt: skip


def test_an_append_after_any_other_commit_is_refused(tmp_path):
    """A stale version is refused even when the other commit added unrelated rows."""
    _, a, b, guard = _writers(tmp_path)
    guard["run-a"].poll()
    start = guard["run-a"].version
    b.upsert("instances", _rows(["/y/1"], "run-b"), run_id="run-b", assume_new=True)
    assert (
        a.append_if_current("instances", _rows(["/x/1"], "run-a"), run_id="run-a", version=start)
        is None
    )
    assert guard["run-a"].poll().url.tolist() == ["/y/1"]
    assert (
        a.append_if_current(
            "instances", _rows(["/x/1"], "run-a"), run_id="run-a", version=guard["run-a"].version
        )
        == start + 2
    )


def _hammer(url: str, name: str, rounds: int) -> None:
    writer = CatalogWriter(url)
    for index in range(rounds):
        rows = [{"volume_id": f"v{index % 3}", "series_key": name, "run_id": name}]
        writer.commit({"volumes": rows}, run_id=name, operation=f"{name}-{index}")


def test_concurrent_catalog_commits_conflict_retry_and_keep_versions_in_order(tmp_path):
    """Three processes merge the same volume keys and record catalog commits at once:
    conflicts are retried, no commit is lost, and catalog versions are positions that
    never change meaning (committed_at order is the order they were committed in)."""
    from deltalake import DeltaTable

    url = str(tmp_path / "cat")
    CatalogWriter(url)
    rounds = 12
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(url, f"w{i}", rounds)) for i in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
        assert proc.exitcode == 0
    cat = open_catalog(url)
    assert cat.version == 3 * rounds
    assert sorted(cat.volumes.volume_id) == ["v0", "v1", "v2"]  # merged, never duplicated
    history = cat.history()
    for column in ("volumes_version", "runs_version"):
        assert np.all(np.diff(history[column].to_numpy()) >= 0), column
    # Delta log order of the _commits rows (one file per commit) equals committed_at order.
    uri = table_url(url, "_commits")
    latest = DeltaTable(uri).version()
    order, before = [], set()
    for version in range(latest + 1):
        files = set(DeltaTable(uri, version=version).file_uris())
        for path in sorted(files - before):
            order += pq.read_table(path).column("operation").to_pylist()
        before = files
    assert order == list(history.operation)


def test_conflicting_commit_retries_are_bounded(tmp_path, monkeypatch):
    """A writer that keeps losing the race gives up with a CatalogError, not a hang."""
    import deltalake

    from voxlake.catalog import tables
    from voxlake.errors import CatalogError

    writer = CatalogWriter(str(tmp_path / "cat"))
    calls = []

    def always_conflicts(*args, **kwargs):
        calls.append(1)
        raise deltalake.exceptions.CommitFailedError("conflict (simulated)")

    monkeypatch.setattr(deltalake, "write_deltalake", always_conflicts)
    monkeypatch.setattr(tables.time, "sleep", lambda s: None)
    with pytest.raises(CatalogError):
        writer.upsert("volumes", [{"volume_id": "v", "run_id": "r"}], run_id="r")
    assert len(calls) == tables.COMMIT_ATTEMPTS
    assert os.path.isdir(tmp_path / "cat")


def test_an_append_that_loses_the_commit_race_itself_is_refused(tmp_path, monkeypatch):
    """The other run commits after this writer saw the table current but before its
    commit: delta-rs is told not to retry, so the commit fails instead of landing later."""
    from deltalake import DeltaTable

    url, a, b, _ = _writers(tmp_path)
    uri = table_url(url, "instances")
    start = DeltaTable(uri).version()
    stale = DeltaTable(uri, version=start)
    monkeypatch.setattr(b, "_table", lambda name: stale)  # b saw `start` as the latest
    a.upsert("instances", _rows(["/x/1"], "run-a"), run_id="run-a", assume_new=True)
    assert (
        b.append_if_current("instances", _rows(["/x/1"], "run-b"), run_id="run-b", version=start)
        is None
    )
    rows = DeltaTable(uri).to_pyarrow_table().to_pylist()
    assert [(r["url"], r["run_id"]) for r in rows] == [("/x/1", "run-a")]
