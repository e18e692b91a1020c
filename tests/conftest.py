"""Shared fixtures: real components only (LocalCluster, Delta tables, Zarr stores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = REPO.parent / "shared" / "data" / "real"
SECRET = "test-secret-do-not-use"


def require_shared_data(*parts: str) -> Path:
    """Path under ../shared/data/real: skip when absent, fail when CI requires it."""
    path = SHARED_REAL.joinpath(*parts)
    if not path.exists():
        message = f"shared test data not found: {path}"
        if os.environ.get("VOXLAKE_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + " (VOXLAKE_REQUIRE_SHARED_DATA=1)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def secret() -> str:
    return SECRET


@pytest.fixture(scope="session")
def dask_client():
    """One real LocalCluster (2 worker processes) shared by the integration tests, started
    the way ``voxlake ingest`` starts its own (``voxlake.cluster.dask_client``)."""
    from voxlake.cluster import dask_client
    from voxlake.config import IngestConfig

    config = IngestConfig(workers=2, memory_limit="3GiB", dashboard_address=":0")
    with dask_client(config) as client:
        yield client


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory):
    """The generator's tiny profile, written once per session (read-only for tests)."""
    from voxlake.testing import generate_sample_data

    return generate_sample_data(tmp_path_factory.mktemp("tiny") / "sample", seed=0, profile="tiny")


@pytest.fixture(scope="session")
def tiny_ingested(tmp_path_factory, tiny_sample, dask_client):
    """The tiny sample ingested once: (manifest, catalog url, store url, report)."""
    from voxlake.config import IngestConfig
    from voxlake.ingest import ingest

    root = tmp_path_factory.mktemp("tiny-ingest")
    catalog, store = str(root / "catalog"), str(root / "volumes.zarr")
    report = ingest(
        [tiny_sample.root / "dicom"],
        catalog=catalog,
        store=store,
        config=IngestConfig(secret=SECRET),
        client=dask_client,
    )
    return tiny_sample, catalog, store, report


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on a loopback port, for the whole session.

    It runs in its own process: moto keeps global state, so an in-process server that a
    fault test stops mid-request could otherwise wedge this one.
    """
    yield from _moto_server()


@pytest.fixture
def other_s3_endpoint():
    """A second S3 API (another moto server), for sources kept apart from the catalog."""
    yield from _moto_server()


def _moto_server():
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket; returns (bucket name, fsspec storage options)."""
    import uuid

    import s3fs

    from voxlake.storage import s3_options

    options = s3_options(s3_endpoint, key="testing", secret="testing")
    import boto3

    fs = s3fs.S3FileSystem(**options)
    bucket = f"vxl-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    yield bucket, options
    fs.rm(bucket, recursive=True)


ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc PACS with its DICOMweb plugin on a loopback port (session-wide); its
    DICOM (DIMSE) server listens on another loopback port, see ``orthanc_dimse``.

    Skips when Orthanc is not installed (Debian packages orthanc, orthanc-dicomweb), except
    in CI where VOXLAKE_REQUIRE_PACS=1 turns the skip into a failure.
    """
    import json
    import subprocess
    import time

    import requests

    if not (os.path.exists(ORTHANC) and os.path.exists(ORTHANC_DICOMWEB)):
        message = "Orthanc with the DICOMweb plugin is not installed"
        if os.environ.get("VOXLAKE_REQUIRE_PACS") == "1":
            pytest.fail(message + " (VOXLAKE_REQUIRE_PACS=1)")
        pytest.skip(message)
    root = tmp_path_factory.mktemp("orthanc")
    port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "VOXLAKE-TEST",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "idx"),
        "Plugins": [ORTHANC_DICOMWEB],
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        # voxlake's default calling AE title, known to the PACS as a real one must be.
        "DicomModalities": {"voxlake": ["VOXLAKE", "127.0.0.1", 11112]},
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "Host": "127.0.0.1",
            "Ssl": False,
        },
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "wb")
    # DCMTK (Orthanc's DICOM stack) leaves Nagle's algorithm on unless told otherwise.
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=log, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{base}/system", timeout=1).ok:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")
        time.sleep(0.1)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def orthanc_loaded(orthanc, tiny_sample):
    """The Orthanc above holding the tiny sample (uploaded through its REST API)."""
    import requests

    for series in tiny_sample.series:
        for path in series.files:
            response = requests.post(
                f"{orthanc}/instances",
                data=path.read_bytes(),
                headers={"Content-Type": "application/dicom"},
                timeout=30,
            )
            response.raise_for_status()
    return orthanc


@pytest.fixture(scope="session")
def orthanc_dimse(orthanc):
    """``dimse://AET@127.0.0.1:PORT`` of the Orthanc above (its AE title and DICOM port,
    read from its REST API)."""
    import requests

    system = requests.get(f"{orthanc}/system", timeout=10).json()
    return f"dimse://{system['DicomAet']}@127.0.0.1:{system['DicomPort']}"
