"""The volume writer encodes chunk layer by chunk layer: what it stores (shard objects,
statistics, pyramid levels) is what writing whole shard layers through zarr stored,
however the caller cuts the volume into slabs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from voxlake.config import StoreConfig
from voxlake.errors import StoreError
from voxlake.volumes import VolumeWriter, volume_path
from voxlake.volumes.layout import choose_layout
from voxlake.volumes.pyramid import downsample2
from voxlake.volumes.sharded import ShardedReader
from voxlake.volumes.writer import _compressors

from .test_shard_writer import WRITER_LAYOUTS
from .test_sharded import make

VID, REV = "ab" * 8, "cd" * 8
PATH = volume_path(VID, REV)
LAYOUTS = {
    **WRITER_LAYOUTS,
    # Shorter than one shard, two chunk layers: the benchmark's CT series in small.
    "one-shard-two-layers": ((50, 70, 66), np.int16, StoreConfig(chunk=32, shard_depth=64)),
    # Odd chunk depth: shard layers of 21 slices, chunk layers of 7.
    "odd-chunks": ((50, 20, 22), np.int16, StoreConfig(chunk=7, shard_depth=16)),
    "4d-two-layers": ((3, 40, 24, 28), np.float32, StoreConfig(chunk=16, shard_depth=32)),
}


def _axes(shape: tuple[int, ...], dtype: Any) -> str:
    return "czyx" if len(shape) == 4 and dtype == np.uint8 else "tzyx"[-len(shape) :]


def _files(root: Path) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): Path(d, f).read_bytes()
        for d, _, files in os.walk(root)
        for f in files
    }


def _zarr_reference(root: Path, data: np.ndarray, config: StoreConfig) -> dict[str, bytes]:
    """Array ``0`` written whole by zarr itself: the objects the writer must reproduce."""
    layout = choose_layout(data.shape, config, axes=_axes(data.shape, data.dtype))
    array = zarr.create_array(
        zarr.storage.LocalStore(root),
        name="0",
        shape=layout.shape,
        dtype=data.dtype,
        chunks=layout.chunks,
        shards=layout.shards,
        compressors=_compressors(config),
        fill_value=0,
        dimension_names=tuple(_axes(data.shape, data.dtype)),
        overwrite=True,
    )
    array[...] = data
    return _files(root)


def _write(root: Path | str, data: np.ndarray, config: StoreConfig, depth: int | None, **kw: Any):
    writer = VolumeWriter(
        root,
        PATH,
        shape=data.shape,
        dtype=data.dtype,
        config=config,
        axes=_axes(data.shape, data.dtype),
        **kw,
    )
    step = depth or writer.slab_depth
    for z0 in range(0, data.shape[-3], step):
        writer.write_slab(z0, data[..., z0 : z0 + step, :, :])
    return writer, writer.commit({"volume_id": VID, "spacing": [1.0, 1.0, 1.0]})


class _PreviousStats:
    """The statistics as the writer computed them before chunk layers, fed whole shard
    layers in order (reference for bit-identical figures)."""

    def __init__(self) -> None:
        self.count, self.total, self.total_sq = 0, 0.0, 0.0
        self.low, self.high = np.inf, -np.inf
        self.samples: list[np.ndarray] = []
        self.offset = 0

    def add(self, data: np.ndarray) -> None:
        for plane in data.reshape(-1, *data.shape[-2:]):
            values = plane.reshape(-1).astype(np.float64)
            self.count += values.size
            self.total += float(values.sum())
            self.total_sq += float(np.dot(values, values))
            self.low = min(self.low, float(values.min()))
            self.high = max(self.high, float(values.max()))
            self.samples.append(values[(-self.offset) % 31 :: 31].astype(np.float32))
            self.offset += values.size

    def result(self) -> dict[str, float]:
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        p01, p50, p99 = (float(v) for v in np.percentile(np.concatenate(self.samples), [1, 50, 99]))
        return {"min": self.low, "max": self.high, "mean": mean, "std": var**0.5,
                "p01": p01, "p50": p50, "p99": p99, "non_finite": 0}  # fmt: skip


def _previous(data: np.ndarray, config: StoreConfig) -> dict[str, float]:
    layer = choose_layout(data.shape, config, axes=_axes(data.shape, data.dtype)).shards[-3]
    stats = _PreviousStats()
    for z0 in range(0, data.shape[-3], layer):
        stats.add(np.ascontiguousarray(data[..., z0 : z0 + layer, :, :]))
    return stats.result()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("depth", [None, 1, 5, 13, 10**6], ids=lambda d: f"slab{d}")
def test_stored_objects_and_statistics_do_not_depend_on_slabs(
    tmp_path: Path, name: str, depth: int | None
) -> None:
    shape, dtype, config = LAYOUTS[name]
    data = make(shape, dtype)
    want = _zarr_reference(tmp_path / "zarr", data, config)
    _, result = _write(tmp_path / "store", data, config, depth)
    got = {
        key.removeprefix(os.path.join(*PATH.split("/")) + os.sep): value
        for key, value in _files(tmp_path / "store").items()
    }
    array = {key for key in want if key.startswith("0" + os.sep)}  # metadata and shards
    assert {key for key in got if key.startswith("0" + os.sep)} == array
    for key in array:
        assert got[key] == want[key], key
    assert result.stats.__dict__ == _previous(data, config)


def test_statistics_are_numpys_on_the_whole_volume(tmp_path: Path) -> None:
    """An independent reference: numpy on the whole array (the percentiles from every
    31st voxel in storage order, as documented)."""
    data = make((150, 61, 70), np.int16, seed=4)
    _, result = _write(tmp_path, data, StoreConfig(), depth=None)
    flat = data.reshape(-1).astype(np.float64)
    stats = result.stats
    assert (stats.min, stats.max) == (flat.min(), flat.max())
    assert stats.mean == pytest.approx(flat.mean(), rel=1e-12)
    assert stats.std == pytest.approx(flat.std(), rel=1e-12)
    sample = data.reshape(-1)[::31].astype(np.float32)
    expected = [float(v) for v in np.percentile(sample, [1, 50, 99])]
    assert [stats.p01, stats.p50, stats.p99] == expected


def test_nan_and_infinite_voxels_are_counted_and_left_out_of_the_statistics(
    tmp_path: Path,
) -> None:
    """A float image with NaN outside its mask (common in NIfTI): the figures are those
    of the finite voxels (they were all NaN), and the others are counted."""
    data = make((40, 30, 33), np.float32, seed=5)
    data[np.random.default_rng(5).random(data.shape) < 0.2] = np.nan
    data[0, 0, :3] = [np.inf, -np.inf, np.nan]
    _, result = _write(tmp_path / "some", data, StoreConfig(), depth=7)
    finite = data[np.isfinite(data)].astype(np.float64)
    stats = result.stats
    assert stats.non_finite == data.size - finite.size > 0
    assert (stats.min, stats.max) == (finite.min(), finite.max())
    assert stats.mean == pytest.approx(finite.mean(), rel=1e-9)
    assert stats.std == pytest.approx(finite.std(), rel=1e-9)
    sample = data.reshape(-1)[::31]  # one shard layer: storage order is visiting order
    expected = [float(v) for v in np.percentile(sample[np.isfinite(sample)], [1, 50, 99])]
    assert [stats.p01, stats.p50, stats.p99] == expected

    data[:] = np.nan
    _, result = _write(tmp_path / "none", data, StoreConfig(), depth=7)
    assert result.stats.non_finite == data.size
    assert all(np.isnan(v) for k, v in result.stats.__dict__.items() if k != "non_finite")


def test_4d_statistics_visit_shard_layers_in_order(tmp_path: Path) -> None:
    shape, dtype, config = LAYOUTS["4d-two-layers"]
    data = make(shape, dtype, seed=2)
    _, result = _write(tmp_path, data, config, depth=None)
    layer = 32
    visited = np.concatenate(
        [data[:, z0 : z0 + layer].reshape(-1) for z0 in range(0, shape[-3], layer)]
    )
    sample = visited[::31].astype(np.float32)
    stats = result.stats
    expected = [float(v) for v in np.percentile(sample, [1, 50, 99])]
    assert [stats.p01, stats.p50, stats.p99] == expected
    assert stats.mean == pytest.approx(float(data.astype(np.float64).mean()), rel=1e-12)


def test_zarr_writes_arrays_the_encoder_does_not_handle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape, dtype, config = LAYOUTS["one-shard-two-layers"]
    data = make(shape, dtype)
    lean_writer, lean = _write(tmp_path / "lean", data, config, depth=None)
    assert lean_writer._shards is not None
    monkeypatch.setattr(ShardedReader, "supports", staticmethod(lambda array: False))
    zarr_writer, through_zarr = _write(tmp_path / "zarr", data, config, depth=7)
    assert zarr_writer._shards is None
    assert _files(tmp_path / "lean") == _files(tmp_path / "zarr")
    assert lean.stats == through_zarr.stats


def test_non_local_store_gets_the_same_objects(tmp_path: Path) -> None:
    shape, dtype, config = LAYOUTS["missing-shard"]
    data = make(shape, dtype)
    _write(tmp_path, data, config, depth=None)
    import fsspec

    root = f"/voxlake-writer-test-{os.getpid()}"
    _write(f"memory://{root}/store", data, config, depth=3)
    fs = fsspec.filesystem("memory")
    try:
        remote = {
            path.split("/store/", 1)[1]: fs.cat_file(path)
            for path in fs.find(f"{root}/store")
            if "/c/" in path
        }
    finally:
        fs.rm(root, recursive=True)
    local = {k.replace(os.sep, "/"): v for k, v in _files(tmp_path).items() if "c" + os.sep in k}
    assert remote and remote == local


@pytest.mark.parametrize("name", ["odd-chunks", "4d-two-layers", "colour-czyx", "default-3d-odd"])
def test_pyramid_levels_are_pooled_as_whole_shard_layers(tmp_path: Path, name: str) -> None:
    shape, dtype, config = LAYOUTS[name]
    data = make(shape, dtype, seed=1)
    _write(tmp_path, data, config, depth=None, levels=2)
    group = zarr.open_group(zarr.storage.LocalStore(tmp_path / PATH), mode="r")
    layer = choose_layout(shape, config, axes=_axes(shape, dtype)).shards[-3]
    level1 = np.concatenate(
        [downsample2(data[..., z0 : z0 + layer, :, :]) for z0 in range(0, shape[-3], layer)],
        axis=-3,
    )
    assert np.array_equal(group["1"][...], level1)
    assert np.array_equal(group["2"][...], downsample2(level1))


def test_slabs_out_of_order_or_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    writer = VolumeWriter(tmp_path, PATH, shape=(10, 8, 8), dtype="int16")
    with pytest.raises(StoreError, match="out of order"):
        writer.write_slab(2, np.zeros((3, 8, 8), np.int16))
    writer.write_slab(0, np.zeros((4, 8, 8), np.int16))
    with pytest.raises(StoreError, match="out of order"):
        writer.write_slab(0, np.zeros((4, 8, 8), np.int16))
    with pytest.raises(StoreError, match="out of order"):
        writer.write_slab(4, np.zeros((7, 8, 8), np.int16))
    with pytest.raises(StoreError, match="does not fit"):
        writer.write_slab(4, np.zeros((2, 8, 9), np.int16))
    writer.abort()


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32])
def test_plane_sums_equal_float64_sums(dtype: Any) -> None:
    """Small integers are summed in a reused buffer, other types in a float64 copy: the
    figures must be the float64 ones, extremes included (a plane of the type's minimum or
    maximum)."""
    from voxlake.volumes.writer import _plane_sums

    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.finfo(dtype)
    rng = np.random.default_rng(5)
    planes = [
        np.full(512 * 512, info.min, dtype),
        np.full(512 * 512, info.max, dtype),
        rng.integers(-3000, 3000, 700 * 700).clip(info.min, info.max).astype(dtype),
    ]
    for plane in planes:
        values = plane.astype(np.float64)
        assert _plane_sums(plane) == (float(values.sum()), float(np.dot(values, values)))


@pytest.mark.parametrize("dtype", [np.int16, np.uint16])
def test_plane_sums_are_exact_across_blocks(dtype: Any) -> None:
    """Planes longer than one float64 block (2^20 values) are summed block by block:
    the figures must be the exact integer sums, with the type's extremes (whose sum of
    squares is past where float64 stops holding every integer)."""
    from voxlake.volumes.writer import _EXACT_BLOCK, _plane_sums, _Scratch

    info = np.iinfo(dtype)
    rng = np.random.default_rng(9)
    size = 3 * _EXACT_BLOCK + 17
    scratch = _Scratch()
    for plane in (
        np.full(size, info.min, dtype),
        np.full(size, info.max, dtype),
        rng.integers(info.min, int(info.max) + 1, size).astype(dtype),
        rng.integers(-5, 5, 1000).clip(info.min, info.max).astype(dtype),  # buffer reused
    ):
        exact = plane.astype(np.int64)
        expected = (float(int(exact.sum())), float(int(np.dot(exact, exact))))
        assert _plane_sums(plane, scratch) == expected
        assert _plane_sums(plane) == expected
