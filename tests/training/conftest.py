"""Tiny real volume stores for the training tests (written with ``write_volume``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from voxlake.volumes import volume_path, write_volume

REVISION = "0123abcd"


def volume_id(i: int) -> str:
    return hashlib.sha256(f"volume-{i}".encode()).hexdigest()[:32]


def write_volumes(
    store: Path,
    count: int,
    *,
    shape: tuple[int, ...] = (8, 8, 8),
    seed: int = 0,
    patients: int | None = None,
) -> pd.DataFrame:
    """Write ``count`` int16 volumes and return their selection (catalog columns + label).

    Odd volumes (label 1) carry a bright cube in the centre, even ones are plain noise,
    so a classifier can tell them apart.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        label = float(i % 2)
        data = rng.normal(0.0, 50.0, size=shape)
        if label:
            z, y, x = (n // 4 for n in shape[-3:])
            data[..., z : -z or None, y : -y or None, x : -x or None] += 400.0
        data = data.astype(np.int16)
        vid = volume_id(i)
        path = volume_path(vid, REVISION)
        result = write_volume(
            store,
            path,
            data,
            attributes={"volume_id": vid, "spacing": [1.0, 1.0, 1.0], "affine": np.eye(4).tolist()},
        )
        rows.append(
            {
                "volume_id": vid,
                "store_url": str(store),
                "store_path": path,
                "patient_key": f"patient-{i % patients if patients else i}",
                "study_key": f"study-{i}",
                "series_key": f"series-{i}",
                "modality": "CT",
                "shape": list(shape),
                "spacing": [1.0, 1.0, 1.0],
                "intensity_mean": result.stats.mean,
                "intensity_std": result.stats.std,
                "intensity_p01": result.stats.p01,
                "intensity_p99": result.stats.p99,
                "units": "HU",
                "label": label,
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def seven_volumes(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Seven 8^3 volumes in one store (shared by a module's tests; read-only)."""
    return write_volumes(tmp_path_factory.mktemp("store7"), 7)


@pytest.fixture(scope="module")
def ten_volumes(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Ten 16^3 volumes of ten patients, half with a bright centre (label 1)."""
    return write_volumes(tmp_path_factory.mktemp("store10"), 10, shape=(16, 16, 16))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3 API on loopback (moto's threaded server): (endpoint, port, server)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}", port, server
    server.stop()


def s3_storage_options(endpoint: str) -> dict:
    return {
        "key": "x",
        "secret": "x",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
        region_name="us-east-1",
    )  # fmt: skip
    client.create_bucket(Bucket=name)
