"""The OME-Zarr volume store: layout policy, atomic writes, statistics, metadata."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxlake.config import StoreConfig
from voxlake.errors import StoreError
from voxlake.volumes import (
    VolumeWriter,
    choose_layout,
    open_volume,
    read_volume,
    volume_attributes,
    volume_path,
    write_volume,
)

VID, REV = "ab" * 12, "cd" * 8


@settings(max_examples=200, deadline=None)
@given(shape=st.tuples(st.integers(1, 700), st.integers(1, 700), st.integers(1, 700)))
def test_layout_chunks_are_cubes_and_shards_hold_whole_chunks(shape):
    layout = choose_layout(shape)
    assert layout.chunks == tuple(min(64, n) for n in shape)
    for chunk, shard, n in zip(layout.chunks, layout.shards, shape, strict=True):
        assert shard % chunk == 0
        assert shard >= min(n, chunk)
    assert layout.shards[1] >= shape[1] and layout.shards[2] >= shape[2]  # whole (y, x) plane
    assert layout.shards[0] <= max(128, layout.chunks[0])


def test_layout_4d_has_unit_time_chunks():
    layout = choose_layout((5, 30, 200, 200))
    assert layout.chunks == (1, 30, 64, 64) and layout.shards[0] == 1


def test_roundtrip_metadata_and_stats(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(-1024, 3000, size=(150, 70, 90)).astype(np.int16)
    affine = np.diag([-0.7, -0.7, 2.0, 1.0]).tolist()
    result = write_volume(
        tmp_path,
        volume_path(VID, REV),
        data,
        attributes={"volume_id": VID, "spacing": [2.0, 0.7, 0.7], "affine": affine},
    )
    back, attrs = read_volume(tmp_path, volume_path(VID, REV))
    assert np.array_equal(back, data) and back.dtype == np.int16
    assert attrs["affine"] == affine and attrs["complete"] is True
    assert result.stats.min == data.min() and result.stats.max == data.max()
    assert result.stats.mean == pytest.approx(data.mean())
    assert result.stats.std == pytest.approx(data.std())
    assert result.stats.p01 == pytest.approx(np.percentile(data, 1), abs=40)
    assert result.stats.p99 == pytest.approx(np.percentile(data, 99), abs=40)
    # Uniform 12-bit noise is incompressible for blosc-lz4 (the default), and edge chunks
    # are stored whole: a few percent over the raw size is all that is allowed.
    assert 0 < result.stored_bytes < 1.1 * result.nbytes
    group = json.loads((tmp_path / VID / REV / "zarr.json").read_text())
    ome = group["attributes"]["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [2.0, 0.7, 0.7]
    array_meta = json.loads((tmp_path / VID / REV / "0" / "zarr.json").read_text())
    assert array_meta["chunk_grid"]["configuration"]["chunk_shape"] == [128, 128, 128]
    assert array_meta["dimension_names"] == ["z", "y", "x"]
    assert not os.listdir(tmp_path / ".staging")  # nothing left behind


def test_patch_reads_only_touched_chunks(tmp_path):
    data = np.arange(100 * 130 * 130, dtype=np.int16).reshape(100, 130, 130)
    write_volume(tmp_path, volume_path(VID, REV), data, attributes={"volume_id": VID})
    array = open_volume(tmp_path, volume_path(VID, REV))
    assert np.array_equal(array[10:20, 64:100, 5:9], data[10:20, 64:100, 5:9])


def test_unfinished_volume_is_never_visible(tmp_path):
    writer = VolumeWriter(tmp_path, volume_path(VID, REV), shape=(10, 8, 8), dtype="int16")
    writer.write_slab(0, np.zeros((5, 8, 8), np.int16))
    with pytest.raises(StoreError) as info:
        writer.commit({"volume_id": VID})
    assert info.value.code == "incomplete_volume"
    assert not (tmp_path / VID).exists()
    with pytest.raises(StoreError):
        volume_attributes(tmp_path, volume_path(VID, REV))
    assert os.listdir(tmp_path / ".staging") == []


def test_dtype_mismatch_and_bad_paths_are_refused(tmp_path):
    writer = VolumeWriter(tmp_path, volume_path(VID, REV), shape=(2, 4, 4), dtype="int16")
    with pytest.raises(StoreError):
        writer.write_slab(0, np.zeros((2, 4, 4), np.float32))
    writer.abort()
    for bad in ("../etc", "AB" * 8, "x/y"):
        with pytest.raises(StoreError):
            volume_path(bad, REV)


def test_same_revision_written_twice_is_kept_once(tmp_path):
    data = np.ones((4, 6, 6), np.uint16)
    for _ in range(2):
        write_volume(tmp_path, volume_path(VID, REV), data, attributes={"volume_id": VID})
    assert os.listdir(tmp_path / VID) == [REV]
    assert np.array_equal(read_volume(tmp_path, volume_path(VID, REV))[0], data)


def test_zstd_codec_option(tmp_path):
    data = np.random.default_rng(1).normal(size=(8, 16, 16)).astype(np.float32)
    write_volume(
        tmp_path,
        volume_path(VID, REV),
        data,
        attributes={"volume_id": VID},
        config=StoreConfig(codec="zstd", clevel=3, chunk=8),
    )
    meta = json.loads((tmp_path / VID / REV / "0" / "zarr.json").read_text())
    assert "zstd" in json.dumps(meta["codecs"])
    assert np.array_equal(read_volume(tmp_path, volume_path(VID, REV))[0], data)
