"""Incremental ingest: new instances of a known series rebuild its volume, superseding the row,
while the catalog version read before still points at the old, still readable data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.ingest import ingest
from voxlake.keys import keyed_hash
from voxlake.volumes import read_volume

from ..conftest import SECRET

pytestmark = pytest.mark.integration


def test_added_instances_rebuild_the_volume_and_old_versions_stay_readable(
    tmp_path, tiny_sample, dask_client
):
    dicom = tiny_sample.root / "dicom"
    series = max(
        (s for s in tiny_sample.series if len(s.files) == s.expected_volume().shape[0]),
        key=lambda s: len(s.files),
    )
    expected = series.expected_volume()
    n = expected.shape[0]
    assert n >= 6
    src, held = tmp_path / "dicom", tmp_path / "held-back"
    shutil.copytree(dicom, src)
    held.mkdir()
    # Hold back the last two slices along the normal: the series is complete without them.
    late = [src / f.relative_to(dicom) for f in series.files[-2:]]
    for path in late:
        shutil.move(path, held / path.name)
    catalog, store = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    config = IngestConfig(secret=SECRET)
    first = ingest([src], catalog=catalog, store=store, config=config, client=dask_client)
    assert first.failures == 0
    before = open_catalog(catalog)
    key = keyed_hash(SECRET, "series", series.spec.series_instance_uid)
    old = before.volumes[before.volumes.series_key == key].iloc[0]
    assert old.n_slices == n - 2
    old_data, _ = read_volume(old.store_url, old.store_path)
    assert np.array_equal(old_data, expected[: n - 2])

    for path in late:  # the two slices arrive later
        shutil.move(held / path.name, path)
    second = ingest([src], catalog=catalog, store=store, config=config, client=dask_client)
    assert second.instances == 2 and second.volumes_written == 1
    assert second.volumes_skipped == len(tiny_sample.series) - 1
    after = open_catalog(catalog)
    rows = after.volumes[after.volumes.series_key == key]
    assert len(rows) == 1, "the rebuilt volume supersedes its row, never duplicates it"
    new = rows.iloc[0]
    assert new.volume_id == old.volume_id
    assert new.revision != old.revision and new.store_path != old.store_path
    assert new.n_slices == n and new.n_instances == n
    assert len(after.volumes) == len(before.volumes)
    new_data, _ = read_volume(new.store_url, new.store_path)
    assert np.array_equal(new_data, expected)
    # The version read before still points at the old revision, whose data is still there.
    pinned = open_catalog(catalog, version=before.version)
    again = pinned.volumes[pinned.volumes.series_key == key].iloc[0]
    assert again.store_path == old.store_path and again.revision == old.revision
    old_again, _ = read_volume(again.store_url, again.store_path)
    assert np.array_equal(old_again, expected[: n - 2])
    assert list(after.history().run_id.drop_duplicates()) == [first.run_id, second.run_id]


def test_a_series_whose_files_were_overwritten_loses_its_volume_row(
    tmp_path, tiny_sample, dask_client
):
    """An export folder refilled in place: every file of one series now holds another
    series. The files' rows are replaced (by URL), and the old series' volume row, with no
    file left behind it, is deleted instead of staying selectable for training; the new
    series is built, and the version read before still shows the old volume."""
    import pydicom
    from pydicom.uid import generate_uid

    src = tmp_path / "dicom"
    shutil.copytree(tiny_sample.root / "dicom", src)
    catalog, store = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    config = IngestConfig(secret=SECRET)
    first = ingest([src], catalog=catalog, store=store, config=config, client=dask_client)
    assert first.failures == 0
    before = open_catalog(catalog)
    series = next(s for s in tiny_sample.series if len(s.files) >= 3)
    old_key = keyed_hash(SECRET, "series", series.spec.series_instance_uid)
    assert (before.volumes.series_key == old_key).sum() == 1
    new_uid = generate_uid()
    for file in series.files:
        path = src / file.relative_to(tiny_sample.root / "dicom")
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = new_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path)

    second = ingest([src], catalog=catalog, store=store, config=config, client=dask_client)
    assert second.failures == 0 and second.volumes_written == 1
    assert second.volumes_retired == 1
    after = open_catalog(catalog)
    assert old_key not in set(after.volumes.series_key)
    assert set(after.volumes.series_key) <= set(after.instances.series_key)
    assert len(after.volumes) == len(before.volumes)
    new = after.volumes[after.volumes.series_key == keyed_hash(SECRET, "series", new_uid)]
    data, _ = read_volume(new.iloc[0].store_url, new.iloc[0].store_path)
    assert np.array_equal(data, series.expected_volume())  # same pixels, other series
    pinned = open_catalog(catalog, version=before.version)
    assert (pinned.volumes.series_key == old_key).sum() == 1
    assert "retire volumes" in set(after.history().operation)
