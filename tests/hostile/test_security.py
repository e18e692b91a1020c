"""Security: nothing identifying and never the secret in anything written; a missing secret
is an error; archives, store paths and PACS answers cannot lead outside their roots.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.errors import SecretMissingError, StoreError
from voxlake.ingest import ingest

from ..conftest import SECRET

REPO = Path(__file__).resolve().parents[2]


def _everything_written(*roots: str | Path) -> bytes:
    """Every byte under ``roots``, plus the decoded rows of every Delta table among them
    (Parquet pages are compressed, so a raw scan alone could miss a value)."""
    from deltalake import DeltaTable

    blobs = []
    for root in roots:
        for dirpath, dirnames, names in os.walk(root):
            blobs += [Path(dirpath, name).read_bytes() for name in names]
            if "_delta_log" in dirnames:
                rows = DeltaTable(dirpath).to_pandas()
                blobs.append(rows.to_json(date_format="iso", default_handler=str).encode())
    return b"\n".join(blobs)


@pytest.mark.integration
def test_no_identifying_value_of_the_hostile_corpus_is_written_anywhere(corpus_run):
    """Names in broken files, invalid UIDs holding names, every character set: none of the
    planted values is in the catalog, the store, the failure messages or any log record
    or warning of the driver and the workers."""
    planted = [p for p in corpus_run.corpus.planted if len(p) >= 6]
    raw = b"".join(
        Path(dirpath, name).read_bytes()
        for dirpath, _, names in os.walk(corpus_run.corpus.archive)
        for name in names
        if Path(dirpath, name).is_file() and not Path(dirpath, name).is_symlink()
    )
    assert sum(p.encode() in raw for p in planted) > len(planted) // 2  # they are there
    written = _everything_written(corpus_run.catalog, corpus_run.store)
    written += corpus_run.log.encode()
    assert [p for p in planted if p.encode() in written] == []


@pytest.mark.integration
def test_the_secret_is_never_written_anywhere(tmp_path, tiny_sample, dask_client):
    from ..ingest.test_log_privacy import _collect_worker_capture, _install_worker_capture

    secret = "vxl-unique-secret-7c1f0e9a2b"
    dask_client.run(_install_worker_capture)
    try:
        report = ingest(
            [tiny_sample.root / "dicom"],
            catalog=tmp_path / "cat",
            store=tmp_path / "vol.zarr",
            config=IngestConfig(secret=secret, key_map_url=str(tmp_path / "keys")),
            client=dask_client,
        )
    finally:
        logs = dask_client.run(_collect_worker_capture)
    assert report.status == "completed" and report.volumes_written
    written = _everything_written(tmp_path / "cat", tmp_path / "vol.zarr", tmp_path / "keys")
    written += json.dumps(logs).encode()
    assert b"key_map_url" in written  # the run's configuration is recorded...
    assert secret.encode() not in written  # ...without the secret
    assert secret[::-1].encode() not in written and secret.upper().encode() not in written


def test_a_missing_secret_is_an_error_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("VOXLAKE_SECRET", raising=False)
    with pytest.raises(SecretMissingError) as info:
        ingest(
            [tmp_path], catalog=tmp_path / "cat", store=tmp_path / "vol.zarr", config=IngestConfig()
        )
    assert info.value.code == "secret_missing" and "VOXLAKE_SECRET" in info.value.hint
    assert not (tmp_path / "cat").exists() and not (tmp_path / "vol.zarr").exists()


def test_the_cli_says_in_one_line_that_the_secret_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VOXLAKE_SECRET"}
    voxlake = Path(sys.executable).with_name("voxlake")
    done = subprocess.run(
        [
            str(voxlake),
            "ingest",
            str(tmp_path),
            "--catalog",
            str(tmp_path / "cat"),
            "--store",
            str(tmp_path / "vol.zarr"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[0].startswith("error [secret_missing]"), output
    assert "VOXLAKE_SECRET" in output and "Traceback" not in output
    assert not (tmp_path / "cat").exists()


@pytest.mark.parametrize(
    "name",
    [
        "../x.dcm",
        "a/../../x.dcm",
        "/etc/passwd",
        "\\windows\\x",
        "C:/x.dcm",
        "C:\\x.dcm",
        "a\x00b.dcm",
        "x::/etc/hostname",
        "zip://inner.dcm",
        "a/b/../../../x",
    ],
)
def test_archive_member_names_that_leave_the_archive_are_refused(name):
    from voxlake.ingest.sources import _safe_member

    assert not _safe_member(name)


@pytest.mark.parametrize("name", ["a.dcm", "P001/ST01/IM1.dcm", "a..b/x.dcm", "...", "a/./b"])
def test_ordinary_member_names_are_accepted(name):
    from voxlake.ingest.sources import _safe_member

    assert _safe_member(name)


def test_store_paths_from_a_tampered_catalog_cannot_leave_the_store(tmp_path):
    """A catalog is data: a row whose store_path climbs out is refused, not followed."""
    from voxlake.volumes import read_volume
    from voxlake.volumes.layout import volume_path

    secret_file = tmp_path / "outside" / "0" / "zarr.json"
    secret_file.parent.mkdir(parents=True)
    secret_file.write_text("{}")
    (tmp_path / "store").mkdir()
    for path in ("../outside", "/etc", "..", "a/../../outside"):
        with pytest.raises(StoreError):
            read_volume(tmp_path / "store", path)
    for bad in ("../x", "a/b", "AB", "00" * 40):
        with pytest.raises(StoreError):
            volume_path(bad, "ab" * 8)


class _HostilePacs(BaseHTTPRequestHandler):
    """A DICOMweb server whose QIDO answers put path syntax where UIDs belong."""

    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        if self.path.startswith("/dicom-web/instances?"):
            uid = {"study": "1.2.3", "series": "1.2.3.4"}
            items = [
                {
                    "0020000D": {"Value": [uid["study"]]},
                    "0020000E": {"Value": [uid["series"]]},
                    "00080018": {"Value": [sop]},
                }
                for sop in ("1.2.3.4.5", "../../../../admin/delete?all=1", "1.2/../../x")
            ]
            body = json.dumps(items).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
        else:
            body = b"not here"
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


def test_pacs_answers_cannot_point_requests_outside_the_dicomweb_root(tmp_path, dask_client):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HostilePacs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _HostilePacs.requests = []
    source = (
        f"dicomweb+http://127.0.0.1:{server.server_address[1]}/dicom-web?StudyInstanceUID=1.2.3"
    )
    try:
        report = ingest(
            [source],
            catalog=tmp_path / "cat",
            store=tmp_path / "vol.zarr",
            config=IngestConfig(secret=SECRET),
            client=dask_client,
        )
    finally:
        server.shutdown()
    assert report.status == "completed"
    fetched = [p for p in _HostilePacs.requests if not p.startswith("/dicom-web/instances?")]
    assert fetched == ["/dicom-web/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"]
    failures = open_catalog(tmp_path / "cat").failures
    assert sorted(failures.code) == ["bad_response", "bad_response", "unreadable"]
    assert not any("admin" in s or ".." in s for s in failures.subject)


def test_the_configuration_recorded_per_run_drops_secrets():
    from voxlake.ingest.report import config_json as _config_json

    text = _config_json(
        IngestConfig(secret="vxl-s3cr3t-abc", storage_options={"secret": "vxl-aws-key-abc"})
    )
    assert "vxl-s3cr3t-abc" not in text and "vxl-aws-key-abc" not in text
