"""Faults with real processes: kill -9 of a Dask worker and of the ingest driver."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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


def _assert_part_and_whole(catalog, manifest):
    """A stopped run left part of the volumes, and each one it shows is whole."""
    assert len(catalog.volumes) < len(manifest.series)
    for row in catalog.volumes.itertuples():
        data, attrs = read_volume(row.store_url, row.store_path)
        assert attrs["complete"] and np.asarray(data).shape == tuple(row.shape)


def _rerun(catalog_url, store_url, manifest, client):
    return ingest(
        [manifest.root / "dicom"], catalog=catalog_url, store=store_url,
        config=IngestConfig(secret=SECRET), client=client,
    )  # fmt: skip


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
    _assert_part_and_whole(catalog, tiny_sample)
    # Re-run: finishes the job, no duplicates, the interrupted work is not redone twice.
    report = _rerun(catalog_url, store_url, tiny_sample, dask_client)
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


STOP = textwrap.dedent(
    """
    import os, signal, sys
    import voxlake.ingest
    from voxlake.cli import main

    real_ingest = voxlake.ingest.ingest

    def ingest(*args, progress, **kwargs):
        def stop(event):
            progress(event)
            if event.stage == "volumes" and event.done >= 1:
                if sys.argv[1].startswith("ctrl-c"):  # as a terminal does: the whole group
                    os.killpg(os.getpgrp(), signal.SIGINT)
                else:  # as docker stop, Kubernetes or a batch scheduler do: the main process
                    os.kill(os.getpid(), signal.SIGTERM)

        return real_ingest(*args, progress=stop, **kwargs)

    def finish_hit_again(self, status, message=None):  # Ctrl-C again as the run stops
        if status == "interrupted":
            os.kill(os.getpid(), signal.SIGINT)
        return real_finish(self, status, message)

    if __name__ == "__main__":
        voxlake.ingest.ingest = ingest  # the CLI imports it when it runs
        if sys.argv[1] == "ctrl-c twice":
            from voxlake.ingest.pipeline import _Run

            real_finish, _Run.finish = _Run.finish, finish_hit_again
        main(["ingest", *sys.argv[2:], "--workers", "2", "--batch-size", "8"])
    """
)


@pytest.mark.parametrize(
    ("how", "code", "said", "recorded"),
    [
        ("ctrl-c", 130, "interrupted", "interrupted by the user"),
        # A second one while the stopped run is committed (it aborted the commit).
        ("ctrl-c twice", 130, "interrupted", "interrupted by the user"),
        ("sigterm", 143, "terminated (SIGTERM)", "stopped by SIGTERM"),
    ],
)
def test_a_stopped_cli_stops_cleanly_and_a_rerun_finishes(
    tmp_path, tiny_sample, dask_client, how, code, said, recorded
):
    """`voxlake ingest` stopped by Ctrl-C in its terminal (SIGINT to its process group, the
    local cluster's workers included) or by SIGTERM to it alone (which killed it at once,
    leaving its run 'running'), or by Ctrl-C twice, the second while the stopped run is
    committed: exit 130 / 143 with a hint, no worker tracebacks, the run marked interrupted
    with what stopped it, only whole volumes visible; the same command again finishes the
    job."""
    catalog_url, store_url = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    script = tmp_path / "stop.py"
    script.write_text(STOP)
    args = [how, str(tiny_sample.root / "dicom"), "--catalog", catalog_url, "--store", store_url]
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
    assert proc.returncode == code, output[-3000:]
    assert said in output and "run the same command again" in output, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    catalog = open_catalog(catalog_url)
    assert list(catalog.runs.status) == ["interrupted"]
    assert list(catalog.runs.message) == [recorded]
    _assert_part_and_whole(catalog, tiny_sample)
    report = _rerun(catalog_url, store_url, tiny_sample, dask_client)
    assert report.status == "completed" and report.failures == 0
    _assert_exactly_once(open_catalog(catalog_url), tiny_sample)


FULL_STORE = textwrap.dedent(
    """
    import json, subprocess, sys
    from voxlake.catalog import open_catalog
    from voxlake.config import IngestConfig
    from voxlake.ingest import ingest
    from voxlake.volumes import read_volume

    voxlake, source, catalog, store = sys.argv[1:5]
    if __name__ == "__main__":
        # In this process's own mount namespace: a store of 200 KiB, full after a volume.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", store], check=True)
        full = subprocess.run(
            [voxlake, "ingest", source, "--catalog", catalog, "--store", store + "/vol.zarr",
             "--workers", "2"], capture_output=True, text=True)
        stopped = open_catalog(catalog)
        subprocess.run(["mount", "-o", "remount,size=64m", store], check=True)  # room again
        report = ingest([source], catalog=catalog, store=store + "/vol.zarr",
                        config=IngestConfig(secret=SECRET, workers=2, dashboard_address=":0"))
        final = open_catalog(catalog)
        shapes = [[[int(n) for n in read_volume(r.store_url, r.store_path)[0].shape],
                   [int(n) for n in r.shape]]
                  for r in final.volumes.itertuples()]
        print(json.dumps({
            "code": full.returncode, "stderr": full.stderr,
            "runs": list(stopped.runs.status), "volumes_then": len(stopped.volumes),
            "failures_then": len(stopped.failures), "status": report.status,
            "failures": report.failures, "volumes": len(final.volumes),
            "unique": bool(final.volumes.series_key.is_unique), "shapes": shapes,
        }))
    """
).replace("SECRET", repr(SECRET))


def _private_mounts_work() -> bool:
    probe = ["unshare", "-rm", "true"]
    return shutil.which("unshare") is not None and subprocess.run(probe).returncode == 0


def test_a_full_store_stops_the_run_with_one_error_and_a_rerun_finishes(tmp_path, tiny_sample):
    """A store on a disk that fills up (a 200 KiB tmpfs in a private mount namespace):
    the run stops at once with `store_full` and a hint (exit 2), not one quarantined
    failure per remaining series; with room again, the same run finishes, each volume
    once."""
    if not _private_mounts_work():
        pytest.skip("needs unshare -rm (a private mount namespace for a small tmpfs)")
    store = tmp_path / "store"
    store.mkdir()
    script = tmp_path / "full_store.py"
    script.write_text(FULL_STORE)
    voxlake = str(Path(sys.executable).with_name("voxlake"))
    args = [voxlake, str(tiny_sample.root / "dicom"), str(tmp_path / "cat"), str(store)]
    child = subprocess.run(
        ["unshare", "-rm", sys.executable, str(script), *args],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "VOXLAKE_SECRET": SECRET},
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    seen = json.loads(child.stdout.splitlines()[-1])
    assert seen["code"] == 2, seen["stderr"][-3000:]
    assert "error [store_full]" in seen["stderr"] and "run the same command again" in seen["stderr"]
    assert "Traceback" not in seen["stderr"] and "Compute Failed" not in seen["stderr"]
    assert seen["runs"] == ["failed"] and seen["failures_then"] == 0
    assert seen["volumes_then"] < len(tiny_sample.series)
    assert seen["status"] == "completed" and seen["failures"] == 0
    assert seen["volumes"] == len(tiny_sample.series) and seen["unique"]
    assert all(stored == declared for stored, declared in seen["shapes"])
