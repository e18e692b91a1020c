"""Faults with real processes: kill -9 of a Dask worker and of the ingest driver."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.ingest import ProgressEvent, ingest
from voxlake.volumes import read_volume

from ..conftest import SECRET

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _assert_exactly_once(catalog, manifest):
    files = sum(len(s.files) for s in manifest.series)
    assert len(catalog.instances) == files
    assert catalog.instances.url.is_unique
    assert len(catalog.volumes) == len(manifest.series)
    assert catalog.volumes.volume_id.is_unique
    assert catalog.volumes.series_key.is_unique


@pytest.mark.parametrize("cluster_kind", ["spawned", "forked"])
def test_killing_a_worker_mid_run_loses_nothing(tmp_path, tiny_sample, cluster_kind):
    """A plain LocalCluster (spawned workers) and voxlake's own (workers forked from its
    forkserver; the nanny starts the replacement)."""
    from distributed import Client, LocalCluster

    from voxlake.cluster import dask_client

    killed = []
    with contextlib.ExitStack() as stack:
        if cluster_kind == "spawned":
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
                )
            )
            client = stack.enter_context(Client(cluster))
        else:
            config = IngestConfig(secret=SECRET, workers=2, dashboard_address=":0")
            client = stack.enter_context(dask_client(config))
            assert os.getpid() not in set(client.run(os.getppid).values())  # forked

        def kill_one_worker(event: ProgressEvent) -> None:
            # First volume event: tasks were just submitted to both workers.
            if event.stage == "volumes" and not killed:
                pids = client.run(os.getpid)
                address, pid = sorted(pids.items())[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(address)

        report = ingest(
            [tiny_sample.root / "dicom"],
            catalog=tmp_path / "cat",
            store=tmp_path / "vol.zarr",
            config=IngestConfig(secret=SECRET),
            client=client,
            progress=kill_one_worker,
        )
    assert killed, "the worker was never killed"
    assert report.status == "completed"
    assert report.failures == 0, report.failures_by_code
    catalog = open_catalog(tmp_path / "cat")
    _assert_exactly_once(catalog, tiny_sample)
    for row in catalog.volumes.itertuples():
        data, attrs = read_volume(row.store_url, row.store_path)
        assert attrs["complete"] and data.shape == tuple(row.shape)


DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from voxlake.config import IngestConfig
    from voxlake.ingest import ingest

    def die(event):
        if event.stage == sys.argv[4] and event.done >= int(sys.argv[5]):
            os.kill(os.getpid(), signal.SIGKILL)   # a real kill -9 of the driver

    if __name__ == "__main__":  # Dask starts workers with spawn
        ingest([sys.argv[1]], catalog=sys.argv[2], store=sys.argv[3],
               config=IngestConfig(secret=SECRET, workers=2, batch_size=8,
                                   dashboard_address=":0"),
               progress=die)
    """
).replace("SECRET", repr(SECRET))


@pytest.mark.parametrize(("stage", "after"), [("headers", 16), ("volumes", 3)])
def test_killing_the_driver_leaves_a_consistent_catalog_and_a_rerun_finishes(
    tmp_path, tiny_sample, dask_client, stage, after
):
    catalog_url, store_url = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(tiny_sample.root / "dicom"),
            catalog_url,
            store_url,
            stage,
            str(after),
        ],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the orphaned cluster of the dead driver
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, output.decode()[-2000:]
    time.sleep(0.5)
    # The catalog opens at its last committed version, and everything it shows is whole.
    catalog = open_catalog(catalog_url)
    assert catalog.version >= 1
    assert list(catalog.runs.status) == ["running"]  # never marked completed
    assert len(catalog.volumes) < len(tiny_sample.series)
    for row in catalog.volumes.itertuples():
        data, attrs = read_volume(row.store_url, row.store_path)
        assert attrs["complete"] and np.asarray(data).shape == tuple(row.shape)
    # Re-run: finishes the job, no duplicates, the interrupted work is not redone twice.
    report = ingest(
        [tiny_sample.root / "dicom"],
        catalog=catalog_url,
        store=store_url,
        config=IngestConfig(secret=SECRET),
        client=dask_client,
    )
    assert report.status == "completed"
    final = open_catalog(catalog_url)
    _assert_exactly_once(final, tiny_sample)
    for series in tiny_sample.series:
        from voxlake.keys import keyed_hash

        row = final.volumes.set_index("series_key").loc[
            keyed_hash(SECRET, "series", series.spec.series_instance_uid)
        ]
        data, _ = read_volume(row.store_url, row.store_path)
        assert np.array_equal(data, series.expected_volume())
    assert set(final.runs.status) == {"running", "completed"}


CTRL_C = textwrap.dedent(
    """
    import os, signal, sys
    import voxlake.ingest
    from voxlake.cli import main

    real_ingest = voxlake.ingest.ingest

    def ingest(*args, progress, **kwargs):
        def press_ctrl_c(event):
            progress(event)
            if event.stage == "volumes" and event.done >= 1:
                os.killpg(os.getpgrp(), signal.SIGINT)  # as a terminal does: the whole group

        return real_ingest(*args, progress=press_ctrl_c, **kwargs)

    if __name__ == "__main__":
        voxlake.ingest.ingest = ingest  # the CLI imports it when it runs
        main(["ingest", *sys.argv[1:], "--workers", "2", "--batch-size", "8"])
    """
)


def test_ctrl_c_stops_the_cli_cleanly_and_a_rerun_finishes(tmp_path, tiny_sample, dask_client):
    """Ctrl-C in the terminal of `voxlake ingest` (SIGINT to its process group, the local
    cluster's workers included): exit 130 with a hint, no worker tracebacks, the run marked
    interrupted, only whole volumes visible; the same command again finishes the job."""
    catalog_url, store_url = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C)
    args = [str(tiny_sample.root / "dicom"), "--catalog", catalog_url, "--store", store_url]
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "VOXLAKE_SECRET": SECRET},
    )
    try:
        output = proc.communicate(timeout=300)[0].decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the interrupted run left
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted" in output and "run the same command again" in output, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    catalog = open_catalog(catalog_url)
    assert list(catalog.runs.status) == ["interrupted"]
    assert len(catalog.volumes) < len(tiny_sample.series)
    for row in catalog.volumes.itertuples():
        data, attrs = read_volume(row.store_url, row.store_path)
        assert attrs["complete"] and np.asarray(data).shape == tuple(row.shape)
    report = ingest(
        [tiny_sample.root / "dicom"],
        catalog=catalog_url,
        store=store_url,
        config=IngestConfig(secret=SECRET),
        client=dask_client,
    )
    assert report.status == "completed" and report.failures == 0
    _assert_exactly_once(open_catalog(catalog_url), tiny_sample)
