"""Incremental ingest: new instances of a known series rebuild its volume, superseding the row,
while the catalog version read before still points at the old, still readable data."""

from __future__ import annotations

import os
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


def _ingested_copy(tmp_path, tiny_sample, dask_client):
    """A copy of the sample's DICOM folder, ingested: (folder, catalog, store, config)."""
    src = tmp_path / "dicom"
    shutil.copytree(tiny_sample.root / "dicom", src)
    catalog, store = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    config = IngestConfig(secret=SECRET)
    first = ingest([src], catalog=catalog, store=store, config=config, client=dask_client)
    assert first.failures == 0
    return src, catalog, store, config


def _longest_volume(tiny_sample, catalog):
    """The sample's longest series stored whole: (series, series_key, volume_id)."""
    series = max(
        (s for s in tiny_sample.series if len(s.files) == s.expected_volume().shape[0]),
        key=lambda s: len(s.files),
    )
    key = keyed_hash(SECRET, "series", series.spec.series_instance_uid)
    (volume_id,) = catalog.volumes.volume_id[catalog.volumes.series_key == key]
    return series, key, volume_id


def test_a_series_whose_files_were_overwritten_loses_its_volume_row(
    tmp_path, tiny_sample, dask_client
):
    """An export folder refilled in place: every file of one series now holds another
    series. The files' rows are replaced (by URL), and the old series' volume row, with no
    file left behind it, is deleted instead of staying selectable for training; the new
    series is built, and the version read before still shows the old volume."""
    import pydicom
    from pydicom.uid import generate_uid

    src, catalog, store, config = _ingested_copy(tmp_path, tiny_sample, dask_client)
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


def _move_to_new_series(ds) -> None:
    from pydicom.uid import generate_uid

    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()


def _cut_pixel_data(ds) -> None:
    ds.PixelData = ds.PixelData[:-64]


@pytest.mark.parametrize(
    ("change", "kind", "code"),
    [
        # A middle file now holds another series: the rest has a gap and fails to assemble.
        (_move_to_new_series, "series", None),
        # A file rewritten with its pixel data cut: the headers plan, the build fails.
        (_cut_pixel_data, "volume", "pixel_length_mismatch"),
    ],
    ids=["no-longer-assembles", "no-longer-builds"],
)
def test_a_series_whose_changed_files_no_longer_build_loses_its_old_volume(
    tmp_path, tiny_sample, dask_client, change, kind, code
):
    """One file of a catalogued series is overwritten in place and the series now fails:
    its old volume (built from a file the catalog no longer holds) is retired, leaving the
    new failure row, instead of staying selectable for training; a re-run changes
    nothing, and the version read before still shows the old volume."""
    from voxlake.testing.hostile import edit_dicom

    src, catalog, store, config = _ingested_copy(tmp_path, tiny_sample, dask_client)
    before = open_catalog(catalog)
    series, key, old = _longest_volume(tiny_sample, before)
    middle = series.files[len(series.files) // 2]
    edit_dicom(src / middle.relative_to(tiny_sample.root / "dicom"), change)

    second = ingest([src], catalog=catalog, store=store, config=config, client=dask_client)
    assert second.failures >= 1 and second.volumes_retired == 1
    after = open_catalog(catalog)
    assert old not in set(after.volumes.volume_id)
    assert key not in set(after.volumes.series_key)
    subject = key if kind == "series" else old
    failed = after.failures[after.failures.subject.str.startswith(subject)]
    assert set(failed.subject_kind) == {kind}
    if code:
        assert set(failed.code) == {code}
    # Every other volume is untouched.
    assert len(after.volumes) == len(before.volumes) - 1
    assert "retire volumes" in set(after.history().operation)
    pinned = open_catalog(catalog, version=before.version)
    assert old in set(pinned.volumes.volume_id)

    third = ingest([src], catalog=catalog, store=store, config=config, client=dask_client)
    assert third.volumes_retired == 0 and third.volumes_written == 0
    again = open_catalog(catalog)
    assert len(again.volumes) == len(after.volumes)
    assert len(again.failures) == len(after.failures)


def test_files_gone_from_a_source_are_counted_and_pruned_on_request(
    tmp_path, tiny_sample, dask_client
):
    """Files deleted from a listed folder keep their rows (and volumes) and are counted;
    with ``prune`` their rows go, the series that lost all its files loses its volume and
    the one that lost its last slice is rebuilt without it. Pruning never reaches files
    under another source, nor a source that lists nothing (a share not mounted)."""
    dicom = tiny_sample.root / "dicom"
    src, other, empty = tmp_path / "dicom", tmp_path / "other", tmp_path / "empty"
    shutil.copytree(dicom, src)
    empty.mkdir()
    complete = [s for s in tiny_sample.series if len(s.files) == s.expected_volume().shape[0]]
    gone_series, shortened = complete[0], max(complete[1:], key=lambda s: len(s.files))
    used = {f.relative_to(dicom).parts[0] for s in (gone_series, shortened) for f in s.files}
    elsewhere = sorted({p.name for p in src.iterdir()} - used)[0]  # a patient folder
    other.mkdir()
    shutil.move(src / elsewhere, other / elsewhere)
    catalog, store = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    config, pruning = IngestConfig(secret=SECRET), IngestConfig(secret=SECRET, prune=True)
    first = ingest([src, other], catalog=catalog, store=store, config=config, client=dask_client)
    assert first.failures == 0
    before = open_catalog(catalog)

    def url(file):
        return str(src / file.relative_to(dicom))

    deleted = [url(f) for f in gone_series.files] + [url(shortened.files[-1])]
    for path in deleted:
        os.remove(path)
    keep = ingest([src, empty], catalog=catalog, store=store, config=config, client=dask_client)
    assert keep.files_missing == len(deleted) and keep.files_pruned == 0
    assert keep.volumes_retired == 0 and keep.empty_sources == [str(empty)]
    kept = open_catalog(catalog)
    assert set(deleted) <= set(kept.instances.url)
    assert len(kept.volumes) == len(before.volumes)

    # Another source, pruned: the files under src are not its business.
    alone = ingest([other], catalog=catalog, store=store, config=pruning, client=dask_client)
    assert alone.files_missing == 0 and alone.files_pruned == 0

    pruned = ingest([src, empty], catalog=catalog, store=store, config=pruning, client=dask_client)
    assert pruned.files_pruned == len(deleted) and pruned.volumes_retired == 1
    after = open_catalog(catalog)
    assert not set(deleted) & set(after.instances.url)
    assert set(after.instances.url) == set(before.instances.url) - set(deleted)
    assert len(after.volumes) == len(before.volumes) - 1
    gone_key = keyed_hash(SECRET, "series", gone_series.spec.series_instance_uid)
    assert gone_key not in set(after.volumes.series_key)
    key = keyed_hash(SECRET, "series", shortened.spec.series_instance_uid)
    row = after.volumes[after.volumes.series_key == key].iloc[0]
    data, _ = read_volume(row.store_url, row.store_path)
    assert np.array_equal(data, shortened.expected_volume()[:-1])
    runs = after.runs.set_index("run_id")
    assert runs.loc[pruned.run_id, "files_pruned"] == len(deleted)
    assert runs.loc[keep.run_id, "files_missing"] == len(deleted)
    assert "prune" in set(after.history().operation)

    # Everything moved away (the share not mounted): nothing is pruned.
    shutil.rmtree(src)
    src.mkdir()
    unmounted = ingest([src], catalog=catalog, store=store, config=pruning, client=dask_client)
    assert unmounted.files_pruned == 0 and unmounted.empty_sources == [str(src)]
    assert len(open_catalog(catalog).instances) == len(after.instances)


def test_pruning_leaves_the_members_of_a_damaged_archive_alone(tmp_path, tiny_sample, dask_client):
    """An archive cut short lists only its first members: the rest are not gone, only
    unreadable now, so ``prune`` keeps their rows (the archive's series are refused as
    ``archive_damaged`` until a good copy returns)."""
    import tarfile

    src = tmp_path / "src"
    src.mkdir()
    archive = src / "series.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tiny_sample.root / "dicom", arcname="dicom")
    catalog, store = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    first = ingest(
        [src], catalog=catalog, store=store, config=IngestConfig(secret=SECRET),
        client=dask_client,
    )  # fmt: skip
    assert first.failures == 0 and first.instances > 4
    before = open_catalog(catalog)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    pruned = ingest(
        [src], catalog=catalog, store=store, config=IngestConfig(secret=SECRET, prune=True),
        client=dask_client,
    )  # fmt: skip
    assert pruned.files_missing == 0 and pruned.files_pruned == 0
    after = open_catalog(catalog)
    # Only the member the cut runs through is read again and fails (losing its row);
    # the members past the cut keep theirs.
    lost = set(before.instances.url) - set(after.instances.url)
    assert len(lost) <= 1 and lost <= set(after.failures.subject)
    assert "corrupt_archive" in set(after.failures.code)


@pytest.mark.slow
def test_the_cli_reports_gone_files_prunes_on_request_and_warns(tmp_path, tiny_sample, dask_client):
    """``voxlake ingest``: gone files are a summary line, an empty source a warning,
    ``--prune`` drops them; local-cluster options beside ``--scheduler`` and a short
    secret are warned about."""
    import subprocess
    import sys

    src, empty = tmp_path / "dicom", tmp_path / "empty"
    shutil.copytree(tiny_sample.root / "dicom", src)
    empty.mkdir()
    common = ["--catalog", str(tmp_path / "cat"), "--store", str(tmp_path / "vol.zarr"),
              "--scheduler", dask_client.scheduler.address]  # fmt: skip

    def run(*args: str, secret: str = SECRET) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "voxlake.cli", "ingest", *args, *common],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "VOXLAKE_SECRET": secret},
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return " ".join((done.stdout + done.stderr).split())  # rich tables: spacing varies

    first = run(str(src), "--workers", "3", "--memory-limit", "1GiB", secret="short")
    assert "warning: --workers and --memory-limit ignored" in first
    assert "fewer than 16 characters" in first
    assert "fewer than 16" not in run(str(src))  # SECRET is long enough
    os.remove(next(p for p in sorted(src.rglob("*.dcm"))))
    kept = run(str(src), str(empty))
    assert "files gone from the sources (kept; --prune drops them) │ 1 │" in kept
    assert f"warning: no file found under {empty}" in kept
    assert "warning: no file found" not in run(str(src))
    pruned = run(str(src), "--prune")
    assert "files gone from the sources: rows pruned │ 1 │" in pruned


def test_overlapping_sources_list_each_file_once(tmp_path, tiny_sample, dask_client):
    """A folder, a subfolder of it and one of its files as sources: each file is listed,
    counted and read once."""
    src = tiny_sample.root / "dicom"
    files = sorted(p for p in src.rglob("*") if p.is_file())
    sub = next(p for p in sorted(src.iterdir()) if p.is_dir())
    report = ingest(
        [src, sub, files[0]], catalog=str(tmp_path / "cat"), store=str(tmp_path / "vol.zarr"),
        config=IngestConfig(secret=SECRET, headers_only=True), client=dask_client,
    )  # fmt: skip
    assert report.files_seen == len(files) == report.instances
    assert len(open_catalog(str(tmp_path / "cat")).instances) == len(files)


def test_the_listing_fills_the_callers_set_and_skips_what_it_holds(tmp_path, tiny_sample):
    """The header stage hands its set of seen URLs to the listing (one set of every URL
    on the driver): files and problems land in it, and URLs already in it are skipped."""
    from voxlake.ingest import iter_file_batches

    src = tmp_path / "src"
    shutil.copytree(tiny_sample.root / "dicom", src)
    (src / "broken.zip").write_bytes(b"PK\x03\x04 not a zip")
    files = sorted(str(p) for p in src.rglob("*") if p.is_file() and p.suffix != ".zip")
    listed = {files[0]}
    batches = list(iter_file_batches([src, src], batch_size=7, listed=listed))
    yielded = [f.url for fs, _ in batches for f in fs]
    problems = [p.url for _, ps in batches for p in ps]
    assert sorted(yielded) == files[1:]
    assert problems == [str(src / "broken.zip")]
    assert listed == {*files, *problems}


def test_a_series_split_differently_keeps_no_old_volume_beside_the_new(
    tmp_path, tiny_sample, dask_client
):
    """Files of a second echo join a catalogued series: it now plans one volume per echo
    under new ids, and the old whole-series volume is retired instead of staying beside
    them (the same slices twice for training)."""
    import pydicom
    from pydicom.uid import generate_uid

    src, catalog, store, config = _ingested_copy(tmp_path, tiny_sample, dask_client)
    before = open_catalog(catalog)
    series, key, old = _longest_volume(tiny_sample, before)
    for file in series.files:  # a second echo of every slice
        ds = pydicom.dcmread(src / file.relative_to(tiny_sample.root / "dicom"))
        ds.EchoNumbers = 2
        ds.EchoTime = 90.0
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(src / file.relative_to(tiny_sample.root / "dicom").with_suffix(".e2.dcm"))

    second = ingest([src], catalog=catalog, store=store, config=config, client=dask_client)
    assert second.failures == 0 and second.volumes_retired == 1
    after = open_catalog(catalog)
    rows = after.volumes[after.volumes.series_key == key]
    assert old not in set(rows.volume_id)
    assert len(rows) >= 2, rows.split_key.tolist()
    assert len(after.volumes) == len(before.volumes) - 1 + len(rows)
