"""The lean shard writer: the objects it stores are byte for byte zarr's own, on every
layout the store uses, locally and through a non-local store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from voxlake.config import StoreConfig
from voxlake.volumes.layout import choose_layout
from voxlake.volumes.sharded import ShardWriter
from voxlake.volumes.writer import _compressors

from .test_sharded import LAYOUTS, make

WRITER_LAYOUTS = {
    **LAYOUTS,
    "colour-czyx": ((3, 21, 30, 26), np.uint8, StoreConfig(chunk=8, shard_depth=16)),
    "blosc-zstd-shuffle": ((36, 40, 44), np.int16, StoreConfig(codec="blosc-zstd", chunk=16)),
}


def _array(store: Any, shape: tuple[int, ...], dtype: type, config: StoreConfig) -> Any:
    axes = "czyx" if len(shape) == 4 and dtype == np.uint8 else None
    layout = choose_layout(shape, config, axes=axes or "tzyx"[-len(shape) :])
    return zarr.create_array(
        store,
        name="0",
        shape=layout.shape,
        dtype=dtype,
        chunks=layout.chunks,
        shards=layout.shards,
        compressors=_compressors(config),
        fill_value=0,
        overwrite=True,
    )


def _write_lean(array: Any, data: np.ndarray, depth: int | None = None) -> None:
    """Slab by slab along z (default: shard layers), as the volume writer streams."""
    writer = ShardWriter(array)
    depth = depth or writer.shards[-3]
    for z0 in range(0, data.shape[-3], depth):
        writer.add(z0, data[..., z0 : z0 + depth, :, :])


def _files(root: Path) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): Path(d, f).read_bytes()
        for d, _, files in os.walk(root)
        for f in files
    }


@pytest.mark.parametrize("name", sorted(WRITER_LAYOUTS))
def test_lean_shards_are_zarrs_bytes(tmp_path: Path, name: str) -> None:
    shape, dtype, config = WRITER_LAYOUTS[name]
    data = make(shape, dtype)
    reference = _array(zarr.storage.LocalStore(tmp_path / "zarr"), shape, dtype, config)
    reference[...] = data
    lean = _array(zarr.storage.LocalStore(tmp_path / "lean"), shape, dtype, config)
    _write_lean(lean, data)
    want, got = _files(tmp_path / "zarr"), _files(tmp_path / "lean")
    assert sorted(got) == sorted(want)  # the same objects, missing (all-fill) ones too
    for key in want:
        assert got[key] == want[key], key
    assert np.array_equal(zarr.open_array(tmp_path / "lean" / "0")[...], data)


def test_through_a_non_local_store_too(tmp_path: Path) -> None:
    shape, dtype, config = LAYOUTS["default-3d-odd"]
    data = make(shape, dtype)
    reference, memory = zarr.storage.MemoryStore(), zarr.storage.MemoryStore()
    _array(reference, shape, dtype, config)[...] = data
    array = _array(memory, shape, dtype, config)
    _write_lean(array, data)
    assert sorted(memory._store_dict) == sorted(reference._store_dict)
    for key, value in reference._store_dict.items():
        assert memory._store_dict[key].to_bytes() == value.to_bytes(), key


def test_rewriting_a_layer_with_fill_removes_its_shard(tmp_path: Path) -> None:
    shape, dtype, config = LAYOUTS["missing-shard"]
    array = _array(zarr.storage.LocalStore(tmp_path), shape, dtype, config)
    data = make(shape, dtype)
    _write_lean(array, data)
    writer = ShardWriter(array)
    depth = writer.shards[0]
    before = _files(tmp_path)
    writer.add(depth, np.zeros((depth, *shape[1:]), dtype))
    assert len(_files(tmp_path)) == len(before) - 1
    data[depth : 2 * depth] = 0
    assert np.array_equal(array[...], data)


def test_unsharded_arrays_are_refused(tmp_path: Path) -> None:
    array = zarr.create_array(
        zarr.storage.LocalStore(tmp_path), name="0", shape=(8, 8, 8), dtype=np.int16
    )
    with pytest.raises(ValueError, match="lean writer"):
        ShardWriter(array)
