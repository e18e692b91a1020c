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
