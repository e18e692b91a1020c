"""End-to-end ingest with a real LocalCluster, real Delta tables and a real Zarr store."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.ingest import ingest
from voxlake.keys import keyed_hash
from voxlake.volumes import read_volume

from ..conftest import SECRET

pytestmark = pytest.mark.integration


def _volume_for(catalog, series_uid: str):
    key = keyed_hash(SECRET, "series", series_uid)
    rows = catalog.volumes[catalog.volumes.series_key == key]
    assert len(rows) == 1, f"expected one volume for the series, got {len(rows)}"
    return rows.iloc[0]


def _store_files(store: str) -> dict[str, float]:
    out = {}
    for dirpath, _, names in os.walk(store):
        if ".staging" in dirpath:
            continue
        for name in names:
            path = os.path.join(dirpath, name)
            out[path] = os.stat(path).st_mtime_ns
    return out


def test_sample_ingest_matches_generator(tiny_ingested):
    manifest, catalog_url, _, report = tiny_ingested
    assert report.status == "completed"
    assert report.failures == 0, report.failures_by_code
    files = sum(len(s.files) for s in manifest.series)
    assert report.instances == files
    catalog = open_catalog(catalog_url)
    assert len(catalog.instances) == files
    assert len(catalog.volumes) == len(manifest.series)
    for series in manifest.series:
        row = _volume_for(catalog, series.spec.series_instance_uid)
        data, attrs = read_volume(row.store_url, row.store_path)
        expected = series.expected_volume()
        assert data.shape == expected.shape
        assert np.array_equal(data, expected), series.spec.series_description
        np.testing.assert_allclose(
            np.array(row.affine).reshape(4, 4), series.expected_affine(), atol=1e-4
        )
        np.testing.assert_allclose(np.array(attrs["affine"]), series.expected_affine(), atol=1e-4)
        exact = float(series.spec.rescale_slope).is_integer()
        if series.spec.modality == "CT":
            assert row.units == "HU"
            assert row["dtype"] == ("int16" if exact else "float32")
        else:
            assert np.dtype(row["dtype"]).kind in "iu"  # MR without rescale stays integer
        assert row.intensity_min == pytest.approx(float(expected.min()))
        assert row.intensity_max == pytest.approx(float(expected.max()))
        assert row.intensity_mean == pytest.approx(float(expected.mean()), rel=1e-6, abs=1e-6)
        assert row.n_slices == expected.shape[0]
        assert list(row.spacing) == pytest.approx(
            [series.spec.slice_spacing, *series.spec.pixel_spacing]
        )


def test_shuffled_and_oblique_series_are_in_spatial_order(tiny_ingested):
    manifest, catalog_url, _, _ = tiny_ingested
    catalog = open_catalog(catalog_url)
    shuffled = [s for s in manifest.series if s.spec.shuffle_instance_numbers]
    oblique = [s for s in manifest.series if abs(s.spec.orientation[1]) > 1e-3]
    assert shuffled and oblique, "the generator must provide both hard cases"
    for series in shuffled + oblique:
        row = _volume_for(catalog, series.spec.series_instance_uid)
        data, _ = read_volume(row.store_url, row.store_path)
        assert np.array_equal(data, series.expected_volume())
        # Slice order follows position along the normal, not InstanceNumber.
        by_position = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
        numbers = [int(ds.InstanceNumber) for ds in by_position]
        if series.spec.shuffle_instance_numbers:
            assert numbers != sorted(numbers)


def test_reingest_adds_nothing_and_rewrites_nothing(tmp_path, tiny_sample, dask_client):
    catalog, store = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    config = IngestConfig(secret=SECRET)
    first = ingest(
        [tiny_sample.root / "dicom"],
        catalog=catalog,
        store=store,
        config=config,
        client=dask_client,
    )
    before = open_catalog(catalog)
    files_before = _store_files(store)
    second = ingest(
        [tiny_sample.root / "dicom"],
        catalog=catalog,
        store=store,
        config=config,
        client=dask_client,
    )
    after = open_catalog(catalog)
    assert first.volumes_written == len(tiny_sample.series)
    assert second.files_skipped == second.files_seen == first.files_seen
    assert second.instances == 0 and second.volumes_written == 0
    assert second.volumes_skipped == len(tiny_sample.series)
    for table in ("instances", "volumes", "failures"):
        assert len(after.read(table)) == len(before.read(table)), table
    assert sorted(after.volumes.store_path) == sorted(before.volumes.store_path)
    assert _store_files(store) == files_before
    assert len(after.runs) == 2 and set(after.runs.status) == {"completed"}


def _copy_sample(tiny_sample, dst: Path) -> Path:
    shutil.copytree(tiny_sample.root / "dicom", dst)
    return dst


def test_corrupt_files_are_quarantined_and_the_rest_ingested(tmp_path, tiny_sample, dask_client):
    src = _copy_sample(tiny_sample, tmp_path / "dicom")
    victim_series = tiny_sample.series[0]
    rel = victim_series.files[len(victim_series.files) // 2].relative_to(tiny_sample.root / "dicom")
    victim = src / rel
    victim.write_bytes(victim.read_bytes()[:300])  # truncated mid-header
    (src / "notes.dcm").write_text("this is not DICOM\n" * 20)
    (src / "empty.dcm").write_bytes(b"")
    (src / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    catalog, store = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    report = ingest(
        [src], catalog=catalog, store=store, config=IngestConfig(secret=SECRET), client=dask_client
    )
    cat = open_catalog(catalog)
    failures = cat.failures.set_index("subject")
    assert failures.loc[str(victim), "code"] == "truncated_header"
    assert failures.loc[str(src / "notes.dcm"), "code"] == "not_dicom"
    assert failures.loc[str(src / "empty.dcm"), "code"] == "empty_file"
    assert failures.loc[str(src / "random.bin"), "code"] == "not_dicom"
    # The series that lost a middle slice is refused, never stored with a gap.
    victim_key = keyed_hash(SECRET, "series", victim_series.spec.series_instance_uid)
    assert failures.loc[victim_key, "code"] == "missing_slice"
    assert victim_key not in set(cat.volumes.series_key)
    # Every other series is ingested intact.
    assert len(cat.volumes) == len(tiny_sample.series) - 1
    for series in tiny_sample.series[1:]:
        row = _volume_for(cat, series.spec.series_instance_uid)
        data, _ = read_volume(row.store_url, row.store_path)
        assert np.array_equal(data, series.expected_volume())
    assert report.failures_by_code["not_dicom"] == 2
    # Failure messages carry no identifying values.
    text = " ".join(cat.failures.message)
    for planted in tiny_sample.planted_identifiers:
        assert planted not in text


def test_changed_file_supersedes_volume_and_old_version_stays_readable(
    tmp_path, tiny_sample, dask_client
):
    src = _copy_sample(tiny_sample, tmp_path / "dicom")
    catalog, store = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    config = IngestConfig(secret=SECRET)
    ingest([src], catalog=catalog, store=store, config=config, client=dask_client)
    v1 = open_catalog(catalog)
    series = tiny_sample.series[3]
    old = _volume_for(v1, series.spec.series_instance_uid)
    path = src / series.files[0].relative_to(tiny_sample.root / "dicom")
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] = pixels[0, 0] + 7
    ds.PixelData = pixels.tobytes()
    ds.save_as(path)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    report = ingest([src], catalog=catalog, store=store, config=config, client=dask_client)
    assert report.instances == 1 and report.volumes_written == 1
    v2 = open_catalog(catalog)
    new = _volume_for(v2, series.spec.series_instance_uid)
    assert new.revision != old.revision and new.store_path != old.store_path
    assert len(v2.volumes) == len(v1.volumes)
    assert len(v2.instances) == len(v1.instances)
    changed = v2.instances[v2.instances.url == str(path)].iloc[0]
    assert changed.content_hash != v1.instances[v1.instances.url == str(path)].iloc[0].content_hash
    new_data, _ = read_volume(new.store_url, new.store_path)
    old_data, _ = read_volume(old.store_url, old.store_path)  # older revision still readable
    assert np.array_equal(old_data, series.expected_volume())
    diff = np.argwhere(new_data != old_data)
    assert len(diff) == 1
    # The pinned old version still points at the old data.
    pinned = open_catalog(catalog, version=v1.version)
    assert _volume_for(pinned, series.spec.series_instance_uid).store_path == old.store_path


def test_no_planted_identifier_reaches_catalog_or_store(tiny_ingested):
    manifest, catalog_url, store_url, _ = tiny_ingested
    planted = [p for p in manifest.planted_identifiers if len(p) >= 6]
    assert planted
    # The raw files do contain them (so their absence below means something).
    raw = b"".join(Path(f).read_bytes() for s in manifest.series for f in s.files)
    assert all(p.encode() in raw for p in planted)
    blobs = []
    for root in (catalog_url, store_url):
        for dirpath, _, names in os.walk(root):
            for name in names:
                blobs.append(Path(dirpath, name).read_bytes())
    # Parquet pages are compressed: also scan every decoded value.
    catalog = open_catalog(catalog_url)
    for table in ("instances", "volumes", "failures", "runs"):
        blobs.append(catalog.read(table).to_json(date_format="iso").encode())
    everything = b"\n".join(blobs)
    leaked = [p for p in planted if p.encode() in everything]
    assert leaked == []


def test_header_tasks_are_split_but_committed_a_batch_at_a_time(tmp_path, tiny_sample, dask_client):
    """Header tasks take a part of batch_size (both workers get work), while header rows
    are still committed batch_size at a time (no more Delta commits than before)."""
    from distributed import get_task_stream

    files = sum(len(s.files) for s in tiny_sample.series)
    config = IngestConfig(secret=SECRET, batch_size=64)
    with get_task_stream(client=dask_client) as stream:
        report = ingest(
            [tiny_sample.root / "dicom"],
            catalog=tmp_path / "catalog",
            store=tmp_path / "volumes.zarr",
            config=config,
            client=dask_client,
        )
    assert report.failures == 0, report.failures_by_code
    assert report.instances == files
    header_tasks = [t for t in stream.data if "catalog_headers" in str(t["key"])]
    listed = report.files_seen
    expected_tasks = (listed // 64) * 4 + -(-(listed % 64) // 16)
    assert len(header_tasks) == expected_tasks
    history = open_catalog(tmp_path / "catalog").history()
    header_commits = int((history["operation"] == "headers").sum())
    assert 1 <= header_commits <= -(-listed // 64)


def test_header_task_size_keeps_the_driver_light_and_every_worker_busy():
    from voxlake.ingest._header_stage import header_task_size

    # A full listing batch: a quarter of a commit batch, at most 256 files a task (each
    # task costs the driver ~10 ms), however many workers there are.
    assert header_task_size(1024, batch_size=1024, threads=2) == 256
    assert header_task_size(1024, batch_size=1024, threads=64) == 256
    assert header_task_size(4096, batch_size=4096, threads=2) == 256
    assert header_task_size(512, batch_size=512, threads=2) == 128
    assert header_task_size(64, batch_size=64, threads=2) == 16
    # Fewer files: two tasks per worker thread, 16 files at least.
    assert header_task_size(300, batch_size=1024, threads=2) == 75
    assert header_task_size(300, batch_size=1024, threads=4) == 38
    assert header_task_size(20, batch_size=1024, threads=2) == 16
    assert header_task_size(300, batch_size=1024, threads=0) == 150  # no worker yet


def _failure_deletes(catalog: str, run_id: str) -> list[str]:
    """Predicates of the deletes of series and volume failures a run wrote (Delta log)."""
    from deltalake import DeltaTable

    return [
        entry["operationParameters"]["predicate"]
        for entry in DeltaTable(os.path.join(catalog, "failures")).history()
        if entry.get("voxlake.run_id") == run_id
        and "subject_kind" in entry.get("operationParameters", {}).get("predicate", "")
    ]


def test_a_healed_series_loses_its_failure_and_nothing_else_is_deleted(
    tmp_path, tiny_sample, dask_client
):
    src = _copy_sample(tiny_sample, tmp_path / "dicom")
    victim_series = tiny_sample.series[0]
    rel = victim_series.files[len(victim_series.files) // 2].relative_to(tiny_sample.root / "dicom")
    kept = (src / rel).read_bytes()
    (src / rel).unlink()  # a middle slice missing: the series cannot be assembled
    catalog, store = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    config = IngestConfig(secret=SECRET)
    first = ingest([src], catalog=catalog, store=store, config=config, client=dask_client)
    victim_key = keyed_hash(SECRET, "series", victim_series.spec.series_instance_uid)
    failures = open_catalog(catalog).failures
    assert list(failures[failures.subject == victim_key].code) == ["missing_slice"]
    assert first.volumes_written == len(tiny_sample.series) - 1
    # No volume built in the first run had an old failure: no delete was written for it.
    assert _failure_deletes(catalog, first.run_id) == []

    (src / rel).write_bytes(kept)  # the slice is back: the series assembles now
    second = ingest([src], catalog=catalog, store=store, config=config, client=dask_client)
    assert second.volumes_written == 1
    cat = open_catalog(catalog)
    assert victim_key not in set(cat.failures.subject)
    assert np.array_equal(
        read_volume(
            *_volume_for(cat, victim_series.spec.series_instance_uid)[["store_url", "store_path"]]
        )[0],
        victim_series.expected_volume(),
    )
    deletes = _failure_deletes(catalog, second.run_id)
    assert len(deletes) == 1 and victim_key in deletes[0]


@pytest.mark.parametrize("seconds", [(0.0, 0.0), (3600.0, 3600.0)])
def test_volume_commits_follow_the_commit_interval(
    tmp_path, tiny_sample, dask_client, monkeypatch, seconds
):
    from voxlake.ingest import _volume_stage

    monkeypatch.setattr(_volume_stage, "VOLUME_COMMIT_SECONDS", seconds)
    catalog = str(tmp_path / "cat")
    report = ingest(
        [tiny_sample.root / "dicom"], catalog=catalog, store=str(tmp_path / "vol.zarr"),
        config=IngestConfig(secret=SECRET), client=dask_client,
    )  # fmt: skip
    history = open_catalog(catalog).history()
    volume_commits = history[(history.run_id == report.run_id) & (history.operation == "volumes")]
    n = len(tiny_sample.series)
    assert report.volumes_written == n
    every = max(1, min(32, n // 10))  # volumes per commit once the floor has passed
    expected = -(-n // every) if seconds[0] == 0 else 1  # an hour's floor: one, at the end
    assert len(volume_commits) == expected


def test_a_failure_another_run_records_meanwhile_is_cleared_when_the_series_builds(
    tmp_path, tiny_sample, dask_client
):
    """Between this run's plan and its volume commits, another run records an assembly
    failure for a series this run builds: the volume commit still clears it (the run
    polls other runs' failure rows; it does not trust its snapshot alone)."""
    from voxlake.catalog.tables import CatalogWriter
    from voxlake.errors import VoxlakeError
    from voxlake.ingest.headers import failure_row

    catalog, store = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    series = tiny_sample.series[1]
    key = keyed_hash(SECRET, "series", series.spec.series_instance_uid)
    injected = []

    def progress(event) -> None:
        if event.stage == "volumes" and event.done == 0 and not injected:
            row = failure_row(
                subject=key, subject_kind="series", run_id="another-run",
                error=VoxlakeError("seen elsewhere", code="missing_slice"),
            )  # fmt: skip
            CatalogWriter(catalog).commit({"failures": [row]}, run_id="another-run", operation="x")
            injected.append(row["failure_id"])

    report = ingest(
        [tiny_sample.root / "dicom"], catalog=catalog, store=store,
        config=IngestConfig(secret=SECRET), client=dask_client, progress=progress,
    )  # fmt: skip
    assert injected and report.volumes_written == len(tiny_sample.series)
    failures = open_catalog(catalog).failures
    assert injected[0] not in set(failures.failure_id)
    assert key not in set(failures.subject)
    assert len(_failure_deletes(catalog, report.run_id)) == 1  # that one, nothing else


def test_headers_only_catalogs_the_files_and_a_later_run_builds_the_volumes(
    tmp_path, tiny_sample, dask_client, tiny_ingested
):
    """A headers-only run writes instances and no volume (no store is needed); the next
    run without it reads no header again and builds the volumes a one-shot run builds."""
    _, one_shot_catalog, _, one_shot = tiny_ingested
    catalog, store = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    config = IngestConfig(secret=SECRET, headers_only=True)
    first = ingest([tiny_sample.root / "dicom"], catalog=catalog, config=config, client=dask_client)
    assert first.status == "completed" and first.headers_only
    assert first.instances == one_shot.instances and first.failures == 0
    assert first.volumes_written == first.volumes_skipped == 0
    surveyed = open_catalog(catalog)
    assert len(surveyed.instances) == first.instances
    assert len(surveyed.volumes) == 0
    assert '"headers_only": true' in surveyed.runs.config_json.iloc[-1]
    assert not Path(store).exists()

    second = ingest(
        [tiny_sample.root / "dicom"], catalog=catalog, store=store,
        config=IngestConfig(secret=SECRET), client=dask_client,
    )  # fmt: skip
    assert not second.headers_only
    assert second.files_skipped == second.files_seen == first.files_seen
    assert second.instances == 0
    assert second.volumes_written == len(tiny_sample.series)
    built, reference = open_catalog(catalog).volumes, open_catalog(one_shot_catalog).volumes
    assert sorted(zip(built.volume_id, built.revision, strict=True)) == sorted(
        zip(reference.volume_id, reference.revision, strict=True)
    )
    for series in tiny_sample.series:
        key = keyed_hash(SECRET, "series", series.spec.series_instance_uid)
        row = built[built.series_key == key].iloc[0]
        data, _ = read_volume(row.store_url, row.store_path)
        assert np.array_equal(data, series.expected_volume()), series.spec.series_description


def test_a_run_that_builds_volumes_needs_a_store(tmp_path, tiny_sample):
    from voxlake.errors import ConfigError

    with pytest.raises(ConfigError, match="volume store") as info:
        ingest(
            [tiny_sample.root / "dicom"],
            catalog=tmp_path / "cat",
            config=IngestConfig(secret=SECRET),
        )
    assert "headers_only" in info.value.hint
    assert not (tmp_path / "cat").exists()


@pytest.mark.parametrize("limit", ["lots", "-1GiB", "GiB"])
def test_a_memory_limit_dask_cannot_read_is_refused_before_the_run_opens(
    tmp_path, tiny_sample, limit
):
    """Dask refused it only as the cluster started (a raw ValueError, after the catalog
    and a 'failed' run were written); 'GiB' it read as 1 GiB."""
    from voxlake.errors import ConfigError

    with pytest.raises(ConfigError, match=r"memory_limit .* is not a size") as info:
        ingest(
            [tiny_sample.root / "dicom"],
            catalog=tmp_path / "cat",
            store=tmp_path / "vol.zarr",
            config=IngestConfig(secret=SECRET, memory_limit=limit),
        )
    assert "4GiB" in info.value.hint
    assert not (tmp_path / "cat").exists()
    for good in ("4GiB", "1500 MB", "0.25", "auto", "0"):
        assert IngestConfig(memory_limit=good).memory_limit == good


def test_the_cli_catalogs_headers_only_without_a_store(tmp_path, tiny_sample, dask_client):
    import subprocess
    import sys

    voxlake = str(Path(sys.executable).with_name("voxlake"))
    env = {**os.environ, "VOXLAKE_SECRET": SECRET}
    source, catalog = str(tiny_sample.root / "dicom"), str(tmp_path / "cat")
    refused = subprocess.run(
        [voxlake, "ingest", source, "--catalog", catalog],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "--store is required unless --headers-only" in refused.stdout + refused.stderr
    assert not Path(catalog).exists()
    done = subprocess.run(
        [voxlake, "ingest", source, "--catalog", catalog, "--headers-only",
         "--scheduler", dask_client.scheduler.address],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert "none: headers only" in done.stdout
    assert "with --store URL (without --headers-only)" in " ".join(output.split())
    surveyed = open_catalog(catalog)
    assert len(surveyed.instances) == sum(len(s.files) for s in tiny_sample.series)
    assert len(surveyed.volumes) == 0


def test_the_cli_prints_a_command_that_shows_what_failed(tmp_path, tiny_sample, dask_client):
    import shlex
    import subprocess
    import sys

    voxlake = str(Path(sys.executable).with_name("voxlake"))
    env = {**os.environ, "VOXLAKE_SECRET": SECRET}
    source = tmp_path / "in dir"  # a space: the printed command quotes the catalog path
    shutil.copytree(tiny_sample.root / "dicom", source)
    victim = sorted(source.rglob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:300])  # cut inside its header
    odd = sorted(source.rglob("*.dcm"))[5]  # read with a warning, and kept
    assert odd.read_bytes().count(b"ISO_IR 100") == 1
    odd.write_bytes(odd.read_bytes().replace(b"ISO_IR 100", b"ISO_IR 999"))
    catalog = tmp_path / "my catalog"
    done = subprocess.run(
        [voxlake, "ingest", str(source), "--catalog", str(catalog), "--store",
         str(tmp_path / "v.zarr"), "--scheduler", dask_client.scheduler.address],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    hint = [line for line in done.stderr.splitlines() if line.startswith("what failed and why")]
    assert len(hint) == 1, done.stderr
    command = shlex.split(hint[0].split(": ", 1)[1])
    assert command[:3] == ["voxlake", "catalog", "query"] and command[3] == str(catalog)
    shown = subprocess.run(
        [voxlake, *command[1:]], capture_output=True, text=True, env=env, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert "truncated_header" in shown.stdout and "file" in shown.stdout
    assert "warning: charset_unknown" in done.stdout
    hint = [line for line in done.stderr.splitlines() if line.startswith("files read with")]
    assert len(hint) == 1, done.stderr
    command = shlex.split(hint[0].split(": ", 1)[1])
    assert command[:4] == ["voxlake", "catalog", "query", str(catalog)]
    shown = subprocess.run(
        [voxlake, *command[1:], "--format", "csv"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[1:] == [f"charset_unknown,1,{odd}"]
    shown = subprocess.run(
        [voxlake, "catalog", "show", str(catalog)], capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"files with warning charset_unknown\s*│\s*1\s", shown.stdout), shown.stdout
