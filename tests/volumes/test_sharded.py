"""The lean sharded reader: bit-exact against zarr on every layout the writer produces,
and fetching exactly the chunks a read touches."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import zarr

from voxlake.config import StoreConfig
from voxlake.volumes import open_store, open_volume, volume_path, write_volume
from voxlake.volumes.counting import CountingStore
from voxlake.volumes.patches import touched_chunks
from voxlake.volumes.sharded import ShardedReader

PATH = volume_path("ab" * 8, "cd" * 4)

LAYOUTS = {
    # name: (shape, dtype, store config)
    "default-3d-odd": ((150, 200, 190), np.int16, StoreConfig()),
    "blosc-lz4": ((70, 90, 65), np.int16, StoreConfig(codec="blosc-lz4", chunk=32)),
    "zstd": ((40, 50, 30), np.int16, StoreConfig(codec="zstd", clevel=3, chunk=16)),
    "float32-small-chunks": ((33, 40, 21), np.float32, StoreConfig(chunk=8, shard_depth=16)),
    "uint8": ((20, 30, 40), np.uint8, StoreConfig(chunk=16, shard_depth=16)),
    "4d": ((3, 20, 24, 28), np.int16, StoreConfig(chunk=16, shard_depth=16)),
    # z < 13 is all zeros: the first shard is never written (its file is missing).
    "missing-shard": ((40, 20, 20), np.int16, StoreConfig(chunk=8, shard_depth=8)),
}


def make(shape: tuple[int, ...], dtype: type, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 40, shape).astype(dtype)
    data[..., : shape[-3] // 3, :, :] = 0  # whole chunks equal to the fill value: not stored
    return data


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, np.ndarray, str]:
    shape, dtype, config = LAYOUTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    data = make(shape, dtype)
    write_volume(
        root, PATH, data, attributes={"volume_id": "ab" * 8, "spacing": [1, 1, 1]}, config=config
    )
    return root, data, request.param


def random_region(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[slice | int, ...]:
    region: list[slice | int] = []
    for axis, n in enumerate(shape):
        if len(shape) == 4 and axis == 0:
            region.append(int(rng.integers(-n, n)))  # an integer index, negative too
            continue
        a = int(rng.integers(0, n))
        b = int(rng.integers(a + 1, n + 1))
        region.append(slice(a, b))
    return tuple(region)


def test_lean_reads_equal_zarr_bit_for_bit(layout: tuple[Path, np.ndarray, str]) -> None:
    root, data, name = layout
    if name == "missing-shard":
        assert not (root / PATH / "0" / "c" / "0" / "0" / "0").exists()
    array = open_volume(root, PATH)
    assert ShardedReader.supports(array)
    reader = ShardedReader(array, threads=3)
    assert reader._root is not None  # a plain local store: read with os.pread
    whole = reader.read((slice(None),) * data.ndim)
    assert whole.dtype == data.dtype
    assert np.array_equal(whole, data)
    assert np.array_equal(whole, array[...])
    rng = np.random.default_rng(7)
    for _ in range(25):
        region = random_region(rng, data.shape)
        got = reader.read(region)
        assert got.dtype == data.dtype
        assert np.array_equal(got, array[region]), region
        assert np.array_equal(got, data[region]), region


def test_reads_through_store_wrappers_equal_direct_reads(
    layout: tuple[Path, np.ndarray, str],
) -> None:
    root, data, _ = layout
    reader = ShardedReader(open_volume(CountingStore(open_store(root, read_only=True)), PATH))
    assert reader._root is None  # every read goes through the wrapper
    assert np.array_equal(reader.read((slice(None),) * data.ndim), data)
    rng = np.random.default_rng(11)
    for _ in range(10):
        region = random_region(rng, data.shape)
        assert np.array_equal(reader.read(region), data[region]), region


def test_emit_writes_into_a_caller_buffer(layout: tuple[Path, np.ndarray, str]) -> None:
    root, data, _ = layout
    reader = ShardedReader(open_volume(root, PATH))
    region = tuple(slice(1, n - 1) for n in data.shape)
    out = np.full([n - 2 for n in data.shape], np.nan, np.float64)

    def emit(part: np.ndarray, view: np.ndarray) -> None:
        np.multiply(part, 2.0, out=view, casting="unsafe")

    assert reader.read(region, out, emit=emit) is out
    assert np.array_equal(out, data[region].astype(np.float64) * 2.0)
    # Into a strided view (the inside of a padded patch), an integer index dropping t.
    first = (-1,) if data.ndim == 4 else ()
    inner = tuple(slice(2, n - 2) for n in data.shape[-3:])
    padded = np.zeros([n + 4 for n in data.shape[-3:]], data.dtype)
    view = padded[tuple(slice(2, -2) for _ in range(3))][inner]
    assert not view.flags.c_contiguous
    reader.read((*first, *inner), view)
    expected = np.zeros_like(padded)
    expected[tuple(slice(2, -2) for _ in range(3))][inner] = data[(*first, *inner)]
    assert np.array_equal(padded, expected)
    with pytest.raises(ValueError, match="shape"):
        reader.read(region, np.empty(3))


def test_unsharded_arrays_are_left_to_zarr(tmp_path: Path) -> None:
    array = zarr.create_array(tmp_path / "plain", shape=(10, 10, 10), chunks=(5, 5, 5), dtype="i2")
    assert not ShardedReader.supports(array)
    with pytest.raises(ValueError, match="not handled"):
        ShardedReader(array)


@pytest.fixture(scope="module")
def default_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("counted")
    shape, dtype, config = LAYOUTS["default-3d-odd"]
    data = make(shape, dtype, seed=3)
    data[:, :, 150:] = 0
    write_volume(
        root, PATH, data, attributes={"volume_id": "ab" * 8, "spacing": [1, 1, 1]}, config=config
    )
    return root, data


def chunk_table(root: Path, array: object) -> tuple[dict[tuple[int, ...], int], int]:
    """Stored size of each chunk, read from the shard indexes on disk."""
    chunks, shards = array.chunks, array.shards  # type: ignore[attr-defined]
    per = tuple(s // c for s, c in zip(shards, chunks, strict=True))
    index_bytes = 16 * int(np.prod(per)) + 4
    grid = [-(-n // s) for n, s in zip(array.shape, shards, strict=True)]  # type: ignore[attr-defined]
    sizes: dict[tuple[int, ...], int] = {}
    for shard in itertools.product(*(range(n) for n in grid)):
        raw = (root / PATH / "0" / "c" / Path(*map(str, shard))).read_bytes()
        table = np.frombuffer(raw[-index_bytes:-4], "<u8").reshape(*per, 2)
        for local in itertools.product(*(range(n) for n in per)):
            nbytes = int(table[local][1])
            coords = tuple(s * p + c for s, p, c in zip(shard, per, local, strict=True))
            sizes[coords] = 0 if nbytes == 2**64 - 1 else nbytes
    return sizes, index_bytes


def test_patches_fetch_exactly_the_touched_chunks_and_each_index_once(
    default_store: tuple[Path, np.ndarray],
) -> None:
    root, data = default_store
    counting = CountingStore(open_store(root, read_only=True))
    array = open_volume(counting, PATH)
    sizes, index_bytes = chunk_table(root, array)
    reader = ShardedReader(array)
    rng = np.random.default_rng(1)
    origins = [(0, 0, 0), (54, 104, 94), (120, 100, 94)]
    origins += [tuple(int(rng.integers(0, n - 96 + 1)) for n in data.shape) for _ in range(15)]
    indexes_read: set[int] = set()
    for origin in origins:
        counting.reset()
        box = tuple(slice(o, o + 96) for o in origin)
        assert np.array_equal(reader.read(box), data[box])
        touched = touched_chunks(data.shape, array.chunks, origin, (96, 96, 96))
        shards = {c[0] * 64 // 128 for c in touched}
        new = shards - indexes_read
        indexes_read |= shards
        stored = [c for c in touched if sizes[c] > 0]
        # The touched chunks' bytes, plus the index of a shard seen for the first time.
        assert counting.bytes_read == sum(sizes[c] for c in stored) + index_bytes * len(new)
        # Adjacent chunks are merged into one request, never more than one per chunk.
        assert len(new) + min(1, len(stored)) <= counting.requests <= len(new) + len(stored)
        assert counting.bytes_read <= 27 * 64**3 * 2 + 2 * index_bytes


def test_whole_volume_fetches_every_stored_byte_once(
    default_store: tuple[Path, np.ndarray],
) -> None:
    root, data = default_store
    counting = CountingStore(open_store(root, read_only=True))
    reader = ShardedReader(open_volume(counting, PATH))
    counting.reset()
    assert np.array_equal(reader.read((slice(None),) * 3), data)
    files = [f for f in (root / PATH / "0" / "c").rglob("*") if f.is_file()]
    assert counting.bytes_read == sum(f.stat().st_size for f in files)
    # Shard 0 whole in one request; shard 1 (cut by the volume's end) its index, then its
    # stored chunks in at most one request each (fewer where they lie side by side).
    assert 3 <= counting.requests <= 1 + 1 + 12
    assert counting.by_key[f"{PATH}/0/c/0/0/0"] == (root / PATH / "0/c/0/0/0").stat().st_size
