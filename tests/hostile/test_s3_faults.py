"""Object storage that fails: unreachable endpoints, a stalled server, a server stopped in
the middle of an ingest. Clear errors, nothing half-written committed, and a re-run after
the outage finishes the job. (Streaming through an outage: tests/training/test_stream_s3.py.)
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import numpy as np
import pytest

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.errors import CatalogError, SourceError
from voxlake.ingest import ProgressEvent, ingest
from voxlake.keys import keyed_hash
from voxlake.storage import s3_options
from voxlake.volumes import read_volume

from ..conftest import SECRET, _free_port

pytestmark = [pytest.mark.integration, pytest.mark.s3]

#: botocore settings that make a dead endpoint fail in seconds, not minutes.
FAST = {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}}


def _options(endpoint: str) -> dict:
    return {**s3_options(endpoint, key="testing", secret="testing"), "config_kwargs": FAST}


class _Link:
    """A TCP relay to the S3 server that a test cuts (open connections reset, new ones
    refused: the endpoint is gone) and restores on the same port. The server itself (the
    session's, in its own process) never notices: moto keeps global state, and stopping
    an in-process server mid-request can wedge it."""

    def __init__(self, target: str) -> None:
        self.target = int(target.rsplit(":", 1)[1])
        self.port = _free_port()
        self._connections: list[socket.socket] = []
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        self._listener.close()
        for conn in self._connections:
            _hang_up(conn)
            conn.close()
        self._connections = []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _hang_up(source)
            _hang_up(sink)


def _hang_up(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the other side or by cut()
        conn.shutdown(socket.SHUT_RDWR)


def test_an_unreachable_source_is_a_clear_error_and_a_failed_run(tmp_path, dask_client):
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(SourceError) as info:
        ingest(
            ["s3://vxl-nowhere/dicom"],
            catalog=tmp_path / "cat",
            store=tmp_path / "vol.zarr",
            config=IngestConfig(secret=SECRET, storage_options=_options(dead)),
            client=dask_client,
        )
    assert info.value.code == "source_unreachable"
    assert time.monotonic() - start < 60
    runs = open_catalog(tmp_path / "cat").runs
    assert list(runs.status) == ["failed"]
    assert runs.message[0].startswith("source_unreachable")
    assert not (tmp_path / "vol.zarr").exists() or not any((tmp_path / "vol.zarr").iterdir())


def test_an_unreachable_catalog_is_a_clear_error_before_anything_is_written(
    tmp_path, tiny_sample, dask_client
):
    dead = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(CatalogError) as info:
        ingest(
            [tiny_sample.root / "dicom"],
            catalog="s3://vxl-nowhere/catalog",
            store=tmp_path / "vol.zarr",
            config=IngestConfig(secret=SECRET),
            catalog_storage_options=_options(dead),
            client=dask_client,
        )
    assert info.value.hint and "catalog" in str(info.value)
    assert not (tmp_path / "vol.zarr").exists()


def _stall_server() -> tuple[str, threading.Event]:
    """A TCP server that accepts connections and never answers (a stalled endpoint)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue
        for conn in held:
            conn.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", stop


def test_a_stalled_endpoint_times_out_instead_of_hanging(tmp_path, dask_client):
    endpoint, stop = _stall_server()
    start = time.monotonic()
    try:
        with pytest.raises(SourceError) as info:
            ingest(
                ["s3://vxl-stalled/dicom"],
                catalog=tmp_path / "cat",
                store=tmp_path / "vol.zarr",
                config=IngestConfig(secret=SECRET, storage_options=_options(endpoint)),
                client=dask_client,
            )
    finally:
        stop.set()
    assert info.value.code == "source_unreachable"
    assert time.monotonic() - start < 90


# The header-stage variant cuts the link when the first listing batch (8 files) has been
# handed to the workers, so the header tasks of the files listed after it run against a
# dead endpoint whatever the load (a "headers" progress event could come after every file
# was already fetched). The volume variant cuts it as the first volume is committed.
@pytest.mark.parametrize(("stage", "after"), [("files", 8), ("volumes", 1)])
def test_an_outage_mid_run_commits_nothing_partial_and_a_rerun_completes(
    tmp_path, tiny_sample, s3_endpoint, dask_client, stage, after
):
    """Sources and store on S3; the endpoint disappears while headers are read, or as the
    first volumes are written, and comes back before the re-run."""
    import uuid

    import boto3
    import s3fs

    link = _Link(s3_endpoint)
    options = _options(link.endpoint)
    bucket = f"vxl-outage-{uuid.uuid4().hex[:8]}"
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    series = tiny_sample.series[:3]  # 36 files: a shorter outage to sit through
    fs = s3fs.S3FileSystem(**_options(s3_endpoint))
    for written in series:
        for path in written.files:
            relative = path.relative_to(tiny_sample.root / "dicom").as_posix()
            fs.put(str(path), f"{bucket}/dicom/{relative}")
    cut: list[float] = []

    def cut_the_link(event: ProgressEvent) -> None:
        if event.stage == stage and event.done >= after and not cut:
            link.cut()
            cut.append(time.monotonic())

    run = {
        "catalog": tmp_path / "cat",
        "store": f"s3://{bucket}/volumes.zarr",
        "config": IngestConfig(secret=SECRET, storage_options=options, batch_size=8),
        "store_storage_options": options,
        "client": dask_client,
    }
    source = f"s3://{bucket}/dicom"
    if stage == "files":
        # Unread files could be slices of any series: no volume is built from the rest.
        with pytest.raises(SourceError) as info:
            ingest([source], **run, progress=cut_the_link)
        assert info.value.code == "source_unreachable" and info.value.hint
    else:
        first = ingest([source], **run, progress=cut_the_link)
        assert first.status == "completed"
    assert cut, "the link was never cut"
    link.restore()
    catalog = open_catalog(tmp_path / "cat")
    # What failed is recorded as retryable infrastructure failures, not as bad data...
    retry = {"store", "source_unreachable", "volume_error"}
    assert len(catalog.failures) and set(catalog.failures.code) <= retry
    if stage == "files":
        assert len(catalog.volumes) == 0 and list(catalog.runs.status) == ["failed"]
    # ...and every volume that was committed is whole.
    for row in catalog.volumes.itertuples():
        data, attrs = read_volume(row.store_url, row.store_path, storage_options=options)
        assert attrs["complete"] and data.shape == tuple(row.shape)
    second = ingest([source], **run)
    assert second.status == "completed" and second.failures == 0
    final = open_catalog(tmp_path / "cat")
    assert len(final.failures) == 0  # the outage's rows are cleared by the re-run
    assert final.volumes.volume_id.is_unique and len(final.volumes) == len(series)
    by_series = final.volumes.set_index("series_key")
    for written in series:
        row = by_series.loc[keyed_hash(SECRET, "series", written.spec.series_instance_uid)]
        data, _ = read_volume(row.store_url, row.store_path, storage_options=options)
        assert np.array_equal(data, written.expected_volume())
    fs.rm(bucket, recursive=True)
    link.cut()


def test_two_writers_of_one_revision_on_s3_never_expose_zeros(s3_bucket):
    """Concurrent ingests may build the same volume revision: the second writer must not
    delete the chunks the first one wrote under a committed row."""
    from voxlake.volumes.writer import VolumeWriter

    bucket, options = s3_bucket
    store = f"s3://{bucket}/volumes.zarr"
    data = np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8)

    def writer() -> VolumeWriter:
        return VolumeWriter(
            store,
            "aa" * 8 + "/" + "bb" * 8,
            shape=data.shape,
            dtype="int16",
            storage_options=options,
        )

    first = writer()
    first.write_slab(0, data)
    first.commit({"volume_id": "aa" * 8, "spacing": [1, 1, 1]})
    second = writer()  # starts after the first committed: its row may be visible already
    got, attrs = read_volume(store, "aa" * 8 + "/" + "bb" * 8, storage_options=options)
    assert attrs["complete"] and np.array_equal(got, data)
    second.write_slab(0, data)
    second.commit({"volume_id": "aa" * 8, "spacing": [1, 1, 1]})
    got, _ = read_volume(store, "aa" * 8 + "/" + "bb" * 8, storage_options=options)
    assert np.array_equal(got, data)
