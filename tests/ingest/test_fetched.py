"""PACS instances retrieved once per run: kept by the header task on its worker, read back
by the volume task placed there (voxlake.ingest.fetched)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections import Counter

import numpy as np
import pytest

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.ingest import fetched, ingest
from voxlake.ingest._header_stage import header_tasks
from voxlake.ingest.sources import FileRef
from voxlake.keys import keyed_hash
from voxlake.testing.hostile import spec_for
from voxlake.testing.synthetic import write_series
from voxlake.volumes import read_volume

from ..conftest import SECRET


def _kept_folders(client, run_id: str) -> dict[str, bool]:
    """Worker address -> whether the run's folder of kept instances exists there."""
    return {w: path.exists() for w, path in client.run(fetched._folder, run_id).items()}


@pytest.mark.integration
def test_kept_bytes_are_read_back_on_their_worker_only(dask_client):
    first, second = sorted(dask_client.scheduler_info()["workers"])
    run, data = "run-keep-test", os.urandom(1000)

    def on(worker: str, function, *args, **kwargs):
        return dask_client.submit(function, *args, **kwargs, workers=[worker], pure=False).result()

    assert on(first, fetched.keep, run, "a", data, budget=2500)
    assert on(first, fetched.keep, run, "b", data, budget=2500)
    # The third would go over the budget of that worker process: retrieved again instead.
    assert not on(first, fetched.keep, run, "c", data, budget=2500)
    assert on(first, fetched.kept_bytes, run) == 2000
    assert on(first, fetched.recall, run, "a") == data
    assert on(first, fetched.recall, run, "c") is None
    assert on(second, fetched.recall, run, "a") is None
    assert _kept_folders(dask_client, run) == {first: True, second: False}
    folder = dask_client.run(fetched._folder, run, workers=[first])[first]
    assert os.stat(folder).st_mode & 0o077 == 0  # the PACS's originals: owner only
    dask_client.run(fetched.drop, run)
    assert not any(_kept_folders(dask_client, run).values())
    assert on(first, fetched.recall, run, "a") is None
    assert on(first, fetched.kept_bytes, run) == 0
    # A folder another run left (its driver killed) goes when it is stale, not before.
    on(first, fetched.keep, "old-run", "a", data, budget=2500)
    on(first, fetched.keep, "recent-run", "a", data, budget=2500)
    old = dask_client.run(fetched._folder, "old-run", workers=[first])[first]
    os.utime(old, (0, time.time() - fetched.STALE_SECONDS - 60))
    assert on(first, fetched.keep, run, "a", data, budget=2500)  # the run's folder is new
    assert _kept_folders(dask_client, "old-run") == {first: False, second: False}
    assert _kept_folders(dask_client, "recent-run")[first]
    for leftover in ("recent-run", run):
        dask_client.run(fetched.drop, leftover)
    # Outside a Dask worker nothing is kept.
    assert not fetched.keep(run, "a", data, budget=1 << 20)
    assert fetched.recall(run, "a") is None


def test_the_budget_is_validated_and_read_from_the_environment_and_the_command_line(
    monkeypatch,
):
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from voxlake.cli import _ingest, app
    from voxlake.config import load_config
    from voxlake.errors import ConfigError

    assert IngestConfig().pacs_cache_bytes == 8 << 30
    with pytest.raises(ConfigError, match="pacs_cache_bytes"):
        IngestConfig(pacs_cache_bytes=-1)
    assert load_config(None, env={"VOXLAKE_PACS_CACHE_BYTES": "1000"}).pacs_cache_bytes == 1000
    seen = []

    def run_ingest(*args, config, **kwargs):  # the command's run, without a cluster
        seen.append(config)
        return SimpleNamespace(status="completed")

    monkeypatch.setattr(_ingest, "run_ingest", run_ingest)
    env = {"VOXLAKE_SECRET": "s", "VOXLAKE_PACS_CACHE_BYTES": "1000"}
    command = ["ingest", "src", "--catalog", "cat", "--store", "vol.zarr"]
    for flags, expected in (([], 1000), (["--pacs-cache-bytes", "0"], 0)):
        result = CliRunner().invoke(app, [*command, *flags], env=env)
        assert result.exit_code == 0, result.output
        assert seen[-1].pacs_cache_bytes == expected  # the flag wins over the environment


def _pacs_ref(series: str, index: int) -> FileRef:
    locator = f"dimse://PACS@host:104/studies/1.2/series/{series}/instances/{index}?class=1"
    return FileRef(f"dimse://PACS@host:104/instances/{series}-{index}", 0, 0.0, locator=locator)


def test_header_tasks_keep_each_pacs_series_in_one_task(monkeypatch):
    files = [FileRef(f"/data/{i}.dcm", 10, 0.0) for i in range(7)]
    a, b, c = ([_pacs_ref(s, i) for i in range(n)] for s, n in (("A", 5), ("B", 2), ("C", 9)))
    # Series arrive interleaved, as a QIDO answer may list them.
    pacs = [r for group in itertools.zip_longest(a, c, b) for r in group if r is not None]

    def shapes(size: int) -> list[list[tuple[str, int]]]:
        tasks = list(header_tasks([*pacs[:4], *files, *pacs[4:]], size))
        assert sorted(r.url for t in tasks for r in t) == sorted(r.url for r in [*files, *pacs])
        return [
            sorted(Counter(r.fetch_url.split("/series/")[1][0] for r in t).items())
            if t[0].locator
            else [("file", len(t))]
            for t in tasks
        ]

    # Files in tasks of `size`; each series whole, small ones together within `size`.
    assert shapes(6) == [[("file", 6)], [("file", 1)], [("A", 5)], [("C", 9)], [("B", 2)]]
    assert shapes(8) == [[("file", 7)], [("A", 5)], [("C", 9)], [("B", 2)]]
    assert shapes(15) == [[("file", 7)], [("A", 5), ("C", 9)], [("B", 2)]]
    assert shapes(16) == [[("file", 7)], [("A", 5), ("B", 2), ("C", 9)]]
    # A series beyond PACS_SERIES_TASK_FILES is split (one task would take too long).
    monkeypatch.setattr("voxlake.ingest._header_stage.PACS_SERIES_TASK_FILES", 4)
    assert [len(t) for t in header_tasks(c, 64)] == [4, 4, 1]


def _orthanc_upload(orthanc: str, files: list) -> None:
    import requests

    for path in files:
        response = requests.post(
            f"{orthanc}/instances", data=path.read_bytes(),
            headers={"Content-Type": "application/dicom"}, timeout=30,
        )  # fmt: skip
        response.raise_for_status()


def _orthanc_delete_study(orthanc: str, study_uid: str) -> None:
    import requests

    found = requests.post(f"{orthanc}/tools/lookup", data=study_uid, timeout=30).json()
    for item in found:
        if item["Type"] == "Study":
            requests.delete(f"{orthanc}/studies/{item['ID']}", timeout=30).raise_for_status()


@pytest.mark.pacs
@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_the_pacs_sends_each_instance_once(protocol, orthanc, orthanc_dimse, tmp_path, dask_client):
    """The study is deleted from the PACS once its headers are catalogued: the volumes are
    still built, from the instances the header tasks kept. With nothing kept, the same run
    cannot build them (the volume tasks ask the PACS again)."""
    name = f"fetched-once-{protocol}"
    specs = [
        dataclasses.replace(spec_for(name), n_slices=6),
        dataclasses.replace(
            spec_for(name),
            series_instance_uid=spec_for(name + "-b").series_instance_uid,
            series_number=3,
            n_slices=5,
        ),
    ]
    study_uid = specs[0].study_instance_uid
    written = [write_series(s, tmp_path / "src" / str(i), seed=i) for i, s in enumerate(specs)]
    root = f"dicomweb+{orthanc}/dicom-web" if protocol == "dicomweb" else orthanc_dimse
    options = {"ae_title": "VOXLAKE", "timeout": 30} if protocol == "dimse" else None
    source = f"{root}?StudyInstanceUID={study_uid}"

    def run(label: str, cache: int):
        _orthanc_upload(orthanc, [f for w in written for f in w.files])

        def on_progress(event) -> None:
            if event.stage == "headers" and event.done == event.total:
                _orthanc_delete_study(orthanc, study_uid)

        report = ingest(
            [source], catalog=tmp_path / label / "cat", store=tmp_path / label / "vol.zarr",
            config=IngestConfig(secret=SECRET, storage_options=options, pacs_cache_bytes=cache),
            client=dask_client, progress=on_progress,
        )  # fmt: skip
        return report

    report = run("kept", 1 << 30)
    assert report.failures == 0, report.failures_by_code
    assert report.volumes_written == len(written)
    catalog = open_catalog(tmp_path / "kept" / "cat")
    by_series = catalog.volumes.set_index("series_key")
    for series in written:
        row = by_series.loc[keyed_hash(SECRET, "series", series.spec.series_instance_uid)]
        data, _ = read_volume(row.store_url, row.store_path)
        assert np.array_equal(data, series.expected_volume())
    # The run removed what its workers kept.
    assert not any(_kept_folders(dask_client, report.run_id).values())

    control = run("not-kept", 0)
    assert control.volumes_written == 0
    assert control.failures == len(written), control.failures_by_code
