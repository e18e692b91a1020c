"""A real PACS (Orthanc + DICOMweb plugin): QIDO-RS search, WADO-RS retrieve, ingest."""

from __future__ import annotations

import numpy as np
import pytest

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.ingest import ingest
from voxlake.ingest.sources import list_source
from voxlake.keys import keyed_hash
from voxlake.volumes import read_volume

from ..conftest import SECRET

pytestmark = [pytest.mark.pacs, pytest.mark.integration]


@pytest.fixture(scope="module")
def pacs(orthanc_loaded):
    """The DICOMweb root of Orthanc holding the tiny sample."""
    return f"dicomweb+{orthanc_loaded}/dicom-web"


def test_qido_listing_keys_urls_and_keeps_locators_out_of_the_catalog(pacs, tiny_sample):
    series = tiny_sample.series[0]
    refs = list(
        list_source(f"{pacs}?SeriesInstanceUID={series.spec.series_instance_uid}", secret=SECRET)
    )
    assert len(refs) == len(series.files)
    for ref in refs:
        assert series.spec.series_instance_uid not in ref.url
        assert series.spec.series_instance_uid in ref.locator
        assert ref.url.startswith(pacs + "/instances/")


def test_ingest_a_study_from_the_pacs(pacs, tiny_sample, tmp_path, dask_client):
    study_uid = tiny_sample.series[0].spec.study_instance_uid
    in_study = [s for s in tiny_sample.series if s.spec.study_instance_uid == study_uid]
    source = f"{pacs}?StudyInstanceUID={study_uid}"
    config = IngestConfig(secret=SECRET)
    report = ingest(
        [source],
        catalog=tmp_path / "cat",
        store=tmp_path / "vol.zarr",
        config=config,
        client=dask_client,
    )
    assert report.failures == 0, report.failures_by_code
    assert report.volumes_written == len(in_study)
    catalog = open_catalog(tmp_path / "cat")
    by_series = catalog.volumes.set_index("series_key")
    for series in in_study:
        row = by_series.loc[keyed_hash(SECRET, "series", series.spec.series_instance_uid)]
        data, _ = read_volume(row.store_url, row.store_path)
        assert np.array_equal(data, series.expected_volume())
    # The bytes are the originals (stored transfer syntax), so content hashes match files.
    import blake3

    files = [f for s in in_study for f in s.files]
    hashes = {"b3:" + blake3.blake3(f.read_bytes()).hexdigest(16) for f in files}
    assert set(catalog.instances.content_hash) == hashes
    text = catalog.instances[["url"]].to_json() + catalog.volumes.to_json(date_format="iso")
    for planted in tiny_sample.planted_identifiers:
        assert planted not in text
    again = ingest(
        [source],
        catalog=tmp_path / "cat",
        store=tmp_path / "vol.zarr",
        config=config,
        client=dask_client,
    )
    assert again.files_skipped == again.files_seen and again.volumes_written == 0


def test_unreachable_pacs_is_a_clear_error(tmp_path, dask_client):
    from voxlake.errors import SourceError

    with pytest.raises(SourceError) as info:
        ingest(
            ["dicomweb+http://127.0.0.1:9/dicom-web"],
            catalog=tmp_path / "cat",
            store=tmp_path / "vol.zarr",
            config=IngestConfig(secret=SECRET),
            client=dask_client,
        )
    assert info.value.code == "source_unreachable"


def test_ingest_over_https_with_a_private_authority_and_credentials(
    orthanc_tls, tiny_sample, tmp_path, dask_client
):
    """As a hospital exposes DICOMweb: HTTPS signed by its own authority, basic auth."""
    from ..conftest import ORTHANC_USER

    base, ca = orthanc_tls
    study_uid = tiny_sample.series[0].spec.study_instance_uid
    in_study = [s for s in tiny_sample.series if s.spec.study_instance_uid == study_uid]
    options = {"verify": str(ca), "auth": list(ORTHANC_USER)}
    config = IngestConfig(secret=SECRET, storage_options=options)
    report = ingest(
        [f"dicomweb+{base}/dicom-web?StudyInstanceUID={study_uid}"],
        catalog=tmp_path / "cat", store=tmp_path / "vol.zarr", config=config, client=dask_client,
    )  # fmt: skip
    assert report.failures == 0, report.failures_by_code
    assert report.volumes_written == len(in_study)
    by_series = open_catalog(tmp_path / "cat").volumes.set_index("series_key")
    for series in in_study:
        row = by_series.loc[keyed_hash(SECRET, "series", series.spec.series_instance_uid)]
        data, _ = read_volume(row.store_url, row.store_path)
        assert np.array_equal(data, series.expected_volume())
    # The password never reaches the catalog.
    catalog = open_catalog(tmp_path / "cat")
    text = catalog.runs.to_json(date_format="iso") + catalog.instances.to_json(date_format="iso")
    assert ORTHANC_USER[1] not in text


def test_https_and_credential_errors_say_what_to_change(orthanc_tls, tiny_sample):
    from voxlake.errors import SourceError

    from ..conftest import ORTHANC_USER

    base, ca = orthanc_tls
    study = tiny_sample.series[0].spec.study_instance_uid
    source = f"dicomweb+{base}/dicom-web?StudyInstanceUID={study}"
    tries = {
        "untrusted": {"auth": list(ORTHANC_USER)},  # the system's authorities only
        "anonymous": {"verify": str(ca)},
        "wrong password": {"verify": str(ca), "auth": [ORTHANC_USER[0], "not-it"]},
    }
    errors = {}
    for name, options in tries.items():
        with pytest.raises(SourceError) as info:
            list(list_source(source, secret=SECRET, storage_options=options))
        errors[name] = info.value
    assert all(e.code == "source_unreachable" for e in errors.values())
    assert "TLS" in errors["untrusted"].message and '"verify"' in errors["untrusted"].hint
    for name in ("anonymous", "wrong password"):
        assert "HTTP 401" in errors[name].message and '"auth"' in errors[name].hint
        assert "not-it" not in errors[name].message + errors[name].hint
    good = {"verify": str(ca), "auth": list(ORTHANC_USER)}
    files = sum(len(s.files) for s in tiny_sample.series if s.spec.study_instance_uid == study)
    assert len(list(list_source(source, secret=SECRET, storage_options=good))) == files
