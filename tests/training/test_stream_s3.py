"""VolumeStream from a real S3 API (moto's server on loopback): volumes, patches, outages."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from voxlake.training import VolumeStream
from voxlake.volumes import write_volume
from voxlake.volumes.counting import CountingStore

from .conftest import free_port, make_bucket, s3_storage_options

pytestmark = [pytest.mark.s3, pytest.mark.integration]


def upload(selection: pd.DataFrame, url: str, options: dict) -> pd.DataFrame:
    """Copy the selection's volumes to ``url`` (written through the S3 API)."""
    from voxlake.volumes import read_volume

    rows = []
    for row in selection.itertuples():
        data, attrs = read_volume(row.store_url, row.store_path)
        write_volume(url, row.store_path, data, attributes=attrs, storage_options=options)
        rows.append(row.store_path)
    return selection.assign(store_url=url)


@pytest.fixture(scope="module")
def on_s3(moto_s3, seven_volumes: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    endpoint, _, _ = moto_s3
    bucket = f"vxl-{uuid.uuid4().hex[:10]}"
    make_bucket(endpoint, bucket)
    options = s3_storage_options(endpoint)
    return upload(seven_volumes, f"s3://{bucket}/volumes.zarr", options), options


def test_s3_streams_the_same_samples_as_local_disk(
    on_s3: tuple[pd.DataFrame, dict], seven_volumes: pd.DataFrame
) -> None:
    remote, options = on_s3
    for kwargs in ({}, {"mode": "patch", "patch_size": (4, 6, 5), "patches_per_volume": 2}):
        local = VolumeStream(seven_volumes, shape=(4, 4, 4), seed=2, batch_size=2, **kwargs)
        s3 = VolumeStream(
            remote, shape=(4, 4, 4), seed=2, batch_size=2, storage_options=options,
            cache_bytes=1 << 20, **kwargs,
        )  # fmt: skip
        expected = [(b["sample"].tolist(), b["image"]) for b in DataLoader(local, batch_size=2)]
        # Fork workers open their own S3 filesystem lazily (nothing shared across the fork).
        got = [
            (b["sample"].tolist(), b["image"])
            for b in DataLoader(s3, batch_size=2, num_workers=2, multiprocessing_context="fork")
        ]
        assert [s for s, _ in got] == [s for s, _ in expected]
        for (_, a), (_, b) in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b)


def test_s3_patch_reads_are_ranged(moto_s3, tmp_path) -> None:
    from .conftest import write_volumes

    endpoint, _, _ = moto_s3
    bucket = f"vxl-{uuid.uuid4().hex[:10]}"
    make_bucket(endpoint, bucket)
    options = s3_storage_options(endpoint)
    selection = upload(
        write_volumes(tmp_path, 1, shape=(128, 256, 128), seed=1), f"s3://{bucket}/v.zarr", options
    )
    counters: list[CountingStore] = []

    def count(store):
        counters.append(CountingStore(store))
        return counters[-1]

    stream = VolumeStream(
        selection, mode="patch", patch_size=(96, 96, 96), patches_per_volume=4,
        storage_options=options, wrap_store=count, prefetch=0,
    )  # fmt: skip
    items = iter(stream)
    next(items)
    counters[0].reset()
    np.asarray(stream._process_reader().array(0, selection.store_path[0])[...])
    whole = counters[0].bytes_read  # the one shard, fetched whole
    for item in items:
        counters[0].reset()
        stream.read_sample(item["sample"])
        # A 96^3 patch of this 2 x 4 x 2-chunk volume touches at most 12 of its 16 chunks:
        # ranged GETs of those (the shard index is kept from the first read, chunks side by
        # side in the shard are merged into one GET), never the whole shard object.
        assert 0 < counters[0].bytes_read <= whole * 12 / 16 + 2100
        assert 1 <= counters[0].requests <= 12


@pytest.mark.slow
def test_a_brief_s3_outage_is_ridden_out_by_retries(
    on_s3: tuple[pd.DataFrame, dict], seven_volumes: pd.DataFrame
) -> None:
    from moto.server import ThreadedMotoServer

    remote, _ = on_s3
    port = free_port()  # a server of our own (moto's data lives in-process, shared)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = s3_storage_options(f"http://127.0.0.1:{port}")
    # No retries below us: botocore would otherwise hide the outage.
    options["config_kwargs"] = {"retries": {"max_attempts": 1}}
    stream = VolumeStream(
        remote, shape=(8, 8, 8), storage_options=options, retries=12, prefetch=0, shuffle=False
    )
    items = iter(stream)
    first = next(items)
    server.stop()
    restarted: list[ThreadedMotoServer] = []

    def restart() -> None:
        time.sleep(1.5)
        again = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        again.start()
        restarted.append(again)

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        started = time.monotonic()
        rest = list(items)
        assert time.monotonic() - started >= 1.0  # the reads did wait for the server
    finally:
        thread.join()
        for srv in restarted:
            srv.stop()
    local = list(VolumeStream(seven_volumes, shape=(8, 8, 8), prefetch=0, shuffle=False))
    for a, b in zip([first, *rest], local, strict=True):
        assert a["volume_id"] == b["volume_id"]
        assert np.allclose(a["image"].numpy(), b["image"].numpy())
