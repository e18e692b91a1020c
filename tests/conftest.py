"""Shared fixtures: real components only (LocalCluster, Delta tables, Zarr stores)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = REPO.parent / "shared" / "data" / "real"
SECRET = "test-secret-do-not-use"

#: Whether torch (the ``train`` extra) is installed. Without it, tests/training is not
#: collected and the tests marked :data:`needs_torch` skip; VOXLAKE_REQUIRE_TORCH=1 (CI's
#: main job) makes its absence an error instead.
TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not TORCH, reason="needs torch (pip install 'voxlake[train]')")
collect_ignore = [] if TORCH else ["training"]


def pytest_configure(config: pytest.Config) -> None:
    if not TORCH and os.environ.get("VOXLAKE_REQUIRE_TORCH") == "1":
        raise pytest.UsageError("torch is not installed (VOXLAKE_REQUIRE_TORCH=1)")


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


def _require_orthanc() -> None:
    if not (os.path.exists(ORTHANC) and os.path.exists(ORTHANC_DICOMWEB)):
        message = "Orthanc with the DICOMweb plugin is not installed"
        if os.environ.get("VOXLAKE_REQUIRE_PACS") == "1":
            pytest.fail(message + " (VOXLAKE_REQUIRE_PACS=1)")
        pytest.skip(message)


@contextlib.contextmanager
def _run_orthanc(root: Path, settings: dict, base: str, **request_options):  # type: ignore[no-untyped-def]
    """Start Orthanc with the DICOMweb plugin and ``settings`` (its HTTP server at
    ``base``); yield ``base`` once it answers; stop it on leaving."""
    import json
    import subprocess
    import time

    import requests

    config = {
        "Name": "VOXLAKE-TEST",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "idx"),
        "Plugins": [ORTHANC_DICOMWEB],
        "RemoteAccessAllowed": False,
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "Host": "127.0.0.1",
            "Ssl": False,  # HTTPS, where a test wants it, is a terminator in front
        },
        **settings,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "wb")
    # DCMTK (Orthanc's DICOM stack) leaves Nagle's algorithm on unless told otherwise.
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{base}/system", timeout=1, **request_options).ok:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")
        time.sleep(0.1)
    try:
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc PACS with its DICOMweb plugin on a loopback port (session-wide); its
    DICOM (DIMSE) server listens on another loopback port, see ``orthanc_dimse``.

    Skips when Orthanc is not installed (Debian packages orthanc, orthanc-dicomweb), except
    in CI where VOXLAKE_REQUIRE_PACS=1 turns the skip into a failure.
    """
    _require_orthanc()
    port, dicom_port = _free_port(), _free_port()
    settings = {
        "HttpPort": port,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        # voxlake's default calling AE title, known to the PACS as a real one must be.
        "DicomModalities": {"voxlake": ["VOXLAKE", "127.0.0.1", 11112]},
    }
    root = tmp_path_factory.mktemp("orthanc")
    with _run_orthanc(root, settings, f"http://127.0.0.1:{port}") as base:
        yield base


#: The user the HTTPS Orthanc knows (``orthanc_tls``).
ORTHANC_USER = ("voxlake", "a-test-password")


@pytest.fixture(scope="session")
def orthanc_tls(tmp_path_factory, tiny_sample):
    """A second Orthanc, exposed as a hospital would expose DICOMweb: HTTP basic
    authentication (user ``ORTHANC_USER``) behind HTTPS whose certificate a private
    authority signed. Yields ``(https_base_url, ca_pem_path)``; it holds the tiny sample's
    first study.

    The HTTPS is a TLS terminator in this process (as nginx or stunnel in front of a
    PACS): the Debian build of Orthanc 1.10 crashes on its own HTTPS connections.
    """
    import requests

    _require_orthanc()
    root = tmp_path_factory.mktemp("orthanc-tls")
    port = _free_port()
    settings = {
        "HttpPort": port,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {ORTHANC_USER[0]: ORTHANC_USER[1]},
        "DicomServerEnabled": False,
    }
    study = tiny_sample.series[0].spec.study_instance_uid
    with _run_orthanc(root, settings, f"http://127.0.0.1:{port}", auth=ORTHANC_USER) as plain:
        for series in tiny_sample.series:
            if series.spec.study_instance_uid != study:
                continue
            for path in series.files:
                requests.post(f"{plain}/instances", data=path.read_bytes(), timeout=30,
                              headers={"Content-Type": "application/dicom"}, auth=ORTHANC_USER
                              ).raise_for_status()  # fmt: skip
        ca, server = _certificates(root)
        with _TlsTerminator(port, server) as tls_port:
            yield f"https://127.0.0.1:{tls_port}", ca


@pytest.fixture(scope="session")
def orthanc_dimse_tls(orthanc_loaded, orthanc_dimse, tmp_path_factory):
    """DICOM over TLS in front of the Orthanc above (a TLS terminator on another loopback
    port, as a hospital's TLS proxy for DIMSE would be). Yields ``(dimse_url, ca_pem)``."""
    import urllib.parse

    peer = urllib.parse.urlsplit(orthanc_dimse)
    ca, server = _certificates(tmp_path_factory.mktemp("dimse-tls"))
    with _TlsTerminator(int(peer.port or 0), server) as port:
        yield f"dimse://{peer.username}@127.0.0.1:{port}", ca


class _TlsTerminator:
    """HTTPS on a loopback port in front of a plain TCP server: each connection is
    decrypted here and relayed to ``backend_port``, byte for byte, both ways."""

    def __init__(self, backend_port: int, cert_chain: Path) -> None:
        import socket
        import ssl

        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert_chain)
        self._backend = backend_port
        self._listener = socket.create_server(("127.0.0.1", 0))

    def __enter__(self) -> int:
        import threading

        threading.Thread(target=self._accept, daemon=True).start()
        return int(self._listener.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self._listener.close()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client) -> None:  # type: ignore[no-untyped-def]
        import select
        import socket
        import ssl

        try:
            tls = self._context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):  # a client that does not trust the certificate
            client.close()
            return
        backend = socket.create_connection(("127.0.0.1", self._backend))
        peers = {tls: backend, backend: tls}
        try:
            while True:
                ready = [tls] if tls.pending() else select.select(list(peers), [], [], 60)[0]
                if not ready:
                    return
                for source in ready:
                    try:
                        data = source.recv(1 << 16)
                    except ssl.SSLWantReadError:  # a partial TLS record: wait for the rest
                        continue
                    if not data:
                        return
                    peers[source].sendall(data)
        except OSError:
            return
        finally:
            tls.close()
            backend.close()


def _certificates(folder: Path) -> tuple[Path, Path]:
    """A private certificate authority (``ca.pem``) and a server certificate it signed for
    127.0.0.1 and localhost, with its key (``server.pem``, for :class:`_TlsTerminator`)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key, key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in "ab")
    ca = (
        x509.CertificateBuilder().subject_name(name("voxlake test CA")).issuer_name(
            name("voxlake test CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    server = (
        x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        # Python 3.13 checks certificates strictly (VERIFY_X509_STRICT): these are needed.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    ca_path, server_path = folder / "ca.pem", folder / "server.pem"
    ca_path.write_bytes(ca.public_bytes(pem))
    server_path.write_bytes(
        server.public_bytes(pem)
        + key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    )  # fmt: skip
    return ca_path, server_path


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
