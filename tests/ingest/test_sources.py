"""Sources: archives read member by member, S3 prefixes, S3 catalog and store."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.ingest import ingest
from voxlake.ingest.sources import list_source
from voxlake.keys import keyed_hash
from voxlake.volumes import read_volume

from ..conftest import SECRET, needs_torch

pytestmark = pytest.mark.integration


def _check_volumes(catalog, manifest, *, storage_options=None, skip=()):
    by_series = catalog.volumes.set_index("series_key")
    for index, series in enumerate(manifest.series):
        if index in skip:
            continue
        row = by_series.loc[keyed_hash(SECRET, "series", series.spec.series_instance_uid)]
        data, _ = read_volume(row.store_url, row.store_path, storage_options=storage_options)
        assert np.array_equal(data, series.expected_volume())


def _zip_sample(manifest, path: Path) -> Path:
    root = manifest.root / "dicom"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(root.rglob("*.dcm")):
            archive.write(file, file.relative_to(root).as_posix())
    return path


def test_zip_and_tar_gz_are_read_without_extracting(tmp_path, tiny_sample, dask_client):
    sources = tmp_path / "incoming"
    sources.mkdir()
    half = len(tiny_sample.series) // 2
    root = tiny_sample.root / "dicom"
    with zipfile.ZipFile(sources / "first.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        for series in tiny_sample.series[:half]:
            for file in series.files:
                z.write(file, Path(file).relative_to(root).as_posix())
    with tarfile.open(sources / "second.tar.gz", "w:gz") as t:
        for series in tiny_sample.series[half:]:
            for file in series.files:
                t.add(file, Path(file).relative_to(root).as_posix())
    before = sorted(os.listdir(sources))
    report = ingest(
        [sources],
        catalog=tmp_path / "cat",
        store=tmp_path / "vol.zarr",
        config=IngestConfig(secret=SECRET),
        client=dask_client,
    )
    assert report.failures == 0, report.failures_by_code
    assert report.volumes_written == len(tiny_sample.series)
    catalog = open_catalog(tmp_path / "cat")
    urls = list(catalog.instances.url)
    assert all(u.startswith(("zip://", "tar://")) and "::" in u for u in urls)
    _check_volumes(catalog, tiny_sample)
    assert sorted(os.listdir(sources)) == before  # nothing extracted next to the archives
    again = ingest(
        [sources],
        catalog=tmp_path / "cat",
        store=tmp_path / "vol.zarr",
        config=IngestConfig(secret=SECRET),
        client=dask_client,
    )
    assert again.files_skipped == again.files_seen and again.volumes_written == 0


def test_a_cut_tar_gz_keeps_its_files_refuses_their_series_and_heals_when_replaced(
    tmp_path, tiny_sample, dask_client
):
    sources = tmp_path / "incoming"
    sources.mkdir()
    root = tiny_sample.root / "dicom"
    first, rest = tiny_sample.series[0], tiny_sample.series[1:]
    with tarfile.open(sources / "rest.tar", "w") as t:
        for series in rest:
            for file in series.files:
                t.add(file, Path(file).relative_to(root).as_posix())
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w:gz") as t:
        for file in first.files:
            t.add(file, Path(file).relative_to(root).as_posix())
    cut = sources / "first.tar.gz"
    cut.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    run = dict(
        catalog=tmp_path / "cat",
        store=tmp_path / "vol.zarr",
        config=IngestConfig(secret=SECRET),
        client=dask_client,
    )
    report = ingest([sources], **run)
    catalog = open_catalog(tmp_path / "cat")
    key = keyed_hash(SECRET, "series", first.spec.series_instance_uid)
    codes = catalog.failures.set_index("subject").code
    assert codes[str(cut)] == "corrupt_archive"
    assert codes[key] == "archive_damaged"
    kept = catalog.instances[catalog.instances.url.str.endswith("::" + str(cut))]
    assert 0 < len(kept) < len(first.files)  # the files before the cut are catalogued
    assert set(kept.series_key) == {key}
    assert report.volumes_written == len(rest)
    assert key not in set(catalog.volumes.series_key)  # no volume of half the series
    _check_volumes(catalog, tiny_sample, skip={0})

    cut.write_bytes(whole.getvalue())  # the archive whole again: the series is built
    again = ingest([sources], **run)
    catalog = open_catalog(tmp_path / "cat")
    assert again.volumes_written == 1 and again.failures == 0
    assert catalog.failures.empty  # the archive's and the series' rows are cleared
    _check_volumes(catalog, tiny_sample)


def test_zip_slip_and_zip_bomb_are_refused(tmp_path, tiny_sample, dask_client):
    archive = _zip_sample(tiny_sample, tmp_path / "sample.zip")
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("../../escape.dcm", b"DICM" * 10)
        z.writestr("/etc/absolute.dcm", b"x")
        z.writestr("bomb.dcm", b"\0" * (64 * 1024 * 1024))  # deflates to ~64 KB
    assert archive.stat().st_size < 2 * 1024 * 1024
    items = list(list_source(archive, max_member_bytes=16 * 1024 * 1024))
    problems = {getattr(i, "code", None) for i in items}
    assert {"unsafe_member_path", "decompression_cap"} <= problems
    report = ingest(
        [archive],
        catalog=tmp_path / "cat",
        store=tmp_path / "vol.zarr",
        config=IngestConfig(secret=SECRET, max_file_bytes=16 * 1024 * 1024),
        client=dask_client,
    )
    catalog = open_catalog(tmp_path / "cat")
    codes = catalog.failures.set_index("subject").code
    assert codes["zip://../../escape.dcm::" + str(archive)] == "unsafe_member_path"
    assert codes["zip://bomb.dcm::" + str(archive)] == "decompression_cap"
    assert report.volumes_written == len(tiny_sample.series)
    _check_volumes(catalog, tiny_sample)
    assert not (tmp_path.parent / "escape.dcm").exists()


def test_worker_caps_decompression_even_when_the_header_lies():
    import gzip

    from voxlake.errors import SourceError
    from voxlake.ingest.dicom_bytes import parse_dicom_bytes
    from voxlake.ingest.file_reads import open_bytes

    bomb = gzip.compress(b"\0" * (8 * 1024 * 1024))
    with pytest.raises(SourceError) as info:
        parse_dicom_bytes(bomb, max_bytes=1024 * 1024)
    assert info.value.code == "decompression_cap"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.dcm", b"\0" * (4 * 1024 * 1024))
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"vxl-cap-{os.getpid()}.zip"
    path.write_bytes(buffer.getvalue())
    try:
        with pytest.raises(SourceError) as info:
            open_bytes(f"zip://big.dcm::{path}", max_bytes=1024 * 1024)
        assert info.value.code == "file_too_large"
    finally:
        path.unlink()


@needs_torch  # streams the volumes back
@pytest.mark.s3
@pytest.mark.slow
def test_s3_source_into_s3_catalog_and_store(tiny_sample, s3_bucket, dask_client):
    import s3fs

    from voxlake.training import VolumeStream

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(tiny_sample.root / "dicom"), f"{bucket}/archive/dicom", recursive=True)
    shutil.copy(tiny_sample.labels_csv, tiny_sample.root / "labels-copy.csv")
    catalog_url, store_url = f"s3://{bucket}/catalog", f"s3://{bucket}/volumes.zarr"
    report = ingest(
        [f"s3://{bucket}/archive/dicom"],
        catalog=catalog_url,
        store=store_url,
        config=IngestConfig(secret=SECRET, storage_options=options),
        catalog_storage_options=options,
        store_storage_options=options,
        client=dask_client,
    )
    assert report.failures == 0, report.failures_by_code
    assert report.volumes_written == len(tiny_sample.series)
    catalog = open_catalog(catalog_url, storage_options=options)
    assert all(u.startswith("s3://") for u in catalog.instances.url)
    assert set(catalog.volumes.store_url) == {store_url}
    assert int(catalog.sql("SELECT count(*) AS n FROM volumes").n[0]) == len(tiny_sample.series)
    _check_volumes(catalog, tiny_sample, storage_options=options)
    stream = VolumeStream(
        catalog.volumes, shape=(8, 8, 8), label_column=None, storage_options=options
    )
    samples = list(stream)
    assert sorted(s["volume_id"] for s in samples) == sorted(catalog.volumes.volume_id)
    assert all(s["image"].shape == (1, 8, 8, 8) for s in samples)
    # A re-run against S3 reads nothing again (the options from the config this time).
    again = ingest(
        [f"s3://{bucket}/archive/dicom"],
        catalog=catalog_url,
        store=store_url,
        config=IngestConfig(
            secret=SECRET,
            storage_options=options,
            catalog_storage_options=options,
            store_storage_options=options,
        ),
        client=dask_client,
    )
    assert again.files_skipped == again.files_seen and again.volumes_written == 0
    # A series deleted from the bucket, pruned (the source given with a trailing slash).
    gone = tiny_sample.series[0]
    for path in gone.files:
        fs.rm(f"{bucket}/archive/dicom/{path.relative_to(tiny_sample.root / 'dicom')}")
    pruned = ingest(
        [f"s3://{bucket}/archive/dicom/"], catalog=catalog_url, store=store_url,
        config=IngestConfig(secret=SECRET, storage_options=options, prune=True),
        catalog_storage_options=options, store_storage_options=options, client=dask_client,
    )  # fmt: skip
    assert pruned.files_missing == pruned.files_pruned == len(gone.files)
    assert pruned.volumes_retired == 1 and not pruned.empty_sources
    after = open_catalog(catalog_url, storage_options=options)
    assert len(after.instances) == len(catalog.instances) - len(gone.files)
    assert len(after.volumes) == len(catalog.volumes) - 1


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("/data/dicom", "/data/dicom"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("zip://P1/IM1::/data/a.zip", "zip://P1/IM1::/data/a.zip"),
        ("dimse://PACS@pacs:104?PatientID=P123&Modality=CT", "dimse://PACS@pacs:104?PatientID=*&Modality=*"),
        ("dicomweb+https://me:pw@pacs/dicom-web?PatientName=DOE^JOHN",
         "dicomweb+https://me@pacs/dicom-web?PatientName=*"),
        ("https://me:pw@host/archive.zip", "https://me@host/archive.zip"),
        ("zip://P1/IM1::https://me:pw@host/a.zip", "zip://P1/IM1::https://me@host/a.zip"),
    ],
)  # fmt: skip
def test_runs_keep_sources_without_passwords_or_pacs_filter_values(given, kept):
    from voxlake.ingest.sources import recorded_source

    assert recorded_source(given) == kept


@pytest.mark.s3
@pytest.mark.slow
def test_cli_sources_on_one_endpoint_catalog_and_store_on_another(
    tiny_sample, s3_bucket, other_s3_endpoint, dask_client, tmp_path
):
    """`voxlake ingest` reads the sources with --storage-options and writes the catalog
    and the store with their own options: two S3 endpoints with different buckets, as a
    hospital's MinIO and a research bucket would be."""
    import subprocess
    import sys

    import boto3
    import s3fs

    from voxlake._docgen import _toml_value
    from voxlake.storage import s3_options

    bucket, options = s3_bucket
    source_options = s3_options(other_s3_endpoint, key="testing", secret="testing")
    boto3.client(
        "s3", endpoint_url=other_s3_endpoint, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    ).create_bucket(Bucket="hospital")  # fmt: skip
    s3fs.S3FileSystem(**source_options).put(
        str(tiny_sample.root / "dicom"), "hospital/dicom", recursive=True
    )
    catalog_url, store_url = f"s3://{bucket}/catalog", f"s3://{bucket}/volumes.zarr"
    voxlake = str(Path(sys.executable).with_name("voxlake"))
    command = [
        voxlake, "ingest", "s3://hospital/dicom", "--catalog", catalog_url,
        "--store", store_url, "--scheduler", dask_client.scheduler.address,
        "--storage-options", json.dumps(source_options),
    ]  # fmt: skip
    env = {**os.environ, "VOXLAKE_SECRET": SECRET}
    # The sources' options for all three: the catalog's bucket is not on that endpoint.
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode != 0
    split = [
        *command,
        "--catalog-storage-options",
        json.dumps(options),
        "--store-storage-options",
        json.dumps(options),
    ]
    done = subprocess.run(split, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    catalog = open_catalog(catalog_url, storage_options=options)
    assert all(url.startswith("s3://hospital/dicom/") for url in catalog.instances.url)
    assert len(catalog.volumes) == len(tiny_sample.series)
    _check_volumes(catalog, tiny_sample, storage_options=options)
    # The same split from a config file's [ingest] table: a re-run that adds nothing.
    config = tmp_path / "voxlake.toml"
    config.write_text(
        "[ingest]\n"
        f"storage_options = {_toml_value(source_options)}\n"
        f"catalog_storage_options = {_toml_value(options)}\n"
        f"store_storage_options = {_toml_value(options)}\n"
    )
    again = subprocess.run(
        [*command, "--config", str(config)], capture_output=True, text=True, env=env, timeout=300
    )
    assert again.returncode == 0, again.stdout + again.stderr
    runs = open_catalog(catalog_url, storage_options=options).runs
    assert len(runs) == 2
    latest = runs.iloc[-1]
    assert latest.files_skipped == latest.files_seen == len(catalog.instances)
    assert latest.volumes_written == 0
