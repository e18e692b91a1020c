"""Write one volume to the OME-Zarr store, whole or not at all.

:class:`VolumeWriter` receives a volume slab by slab, in order, so a worker never needs
the whole volume in memory, accumulates intensity statistics on the way, and makes the
volume visible only at :meth:`VolumeWriter.commit`. A shard spans ``shard_depth`` slices
but its voxels are never held at once: each chunk layer (the chunks' depth of slices) is
encoded as soon as it is complete, and only the encoded chunks wait for the rest of their
shard (:class:`~voxlake.volumes.sharded.ShardWriter`). The volume is made visible at commit:

- local stores: the group is written under ``<store>/.staging/<uuid>`` and renamed into
  place (atomic on POSIX); if the final path already exists it holds the identical
  revision (revisions are content digests), so the staging copy is dropped.
- object stores: chunks and the array metadata go first, the group's ``voxlake.complete``
  attribute last. Readers only reach volumes through committed catalog rows anyway.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from voxlake.config import StoreConfig
from voxlake.errors import StoreError
from voxlake.volumes.layout import (
    ArrayLayout,
    choose_layout,
    is_local_url,
    join_url,
    ome_multiscales,
    strip_file_scheme,
)
from voxlake.volumes.pyramid import downsample2
from voxlake.volumes.reader import open_store
from voxlake.volumes.sharded import ShardedReader, ShardWriter

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["IntensityStats", "VolumeWriter", "WriteResult", "write_volume"]

_PERCENTILE_STRIDE = 31  # every 31st voxel feeds the percentile estimate (deterministic)


@dataclass(frozen=True)
class IntensityStats:
    """Intensity statistics of a stored volume (percentiles from a strided sample)."""

    min: float
    max: float
    mean: float
    std: float
    p01: float
    p50: float
    p99: float
    #: Voxels that are NaN or infinite (float images only), left out of every figure above.
    non_finite: int = 0


@dataclass(frozen=True)
class WriteResult:
    """What was written: where, how big, and the statistics of the values."""

    store_url: str
    path: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...]
    nbytes: int
    stored_bytes: int
    stats: IntensityStats


class _StatsAccumulator:
    """Statistics of the planes of a volume, in a fixed visiting order.

    Planes are visited shard layer by shard layer, each layer in (t or c, z) order: the
    order in which a writer fed whole shard layers saw them. The sums and the strided
    percentile sample depend on that order (floating-point addition, every 31st voxel),
    so the figures do not depend on how a caller cuts the volume into slabs.
    """

    def __init__(self, shape: tuple[int, ...], shard_depth: int) -> None:
        self._lead = int(np.prod(shape[:-3], dtype=np.int64))
        self._depth = shape[-3]
        self._shard_depth = shard_depth
        self._plane = shape[-2] * shape[-1]
        # visiting index -> (sum, sum of squares, min, max, percentile sample, voxels left
        # out: NaN or infinite)
        self._planes: dict[int, tuple[float, float, float, float, np.ndarray, int]] = {}
        self._scratch = _Scratch()

    def _visit(self, lead: int, z: int) -> int:
        first = z - z % self._shard_depth
        depth = min(self._shard_depth, self._depth - first)
        return self._lead * first + lead * depth + z - first

    def add(self, z0: int, data: np.ndarray) -> None:
        """Add the planes of ``data`` ((dz, y, x) or (t, dz, y, x) from slice ``z0``)."""
        # Plane by plane: converting a whole slab to float64 would cost 4x its int16 size.
        leads = data.shape[:-3]
        for index in np.ndindex(*leads, data.shape[-3]):
            plane = data[index].reshape(-1)
            lead = int(np.ravel_multi_index(index[:-1], leads)) if leads else 0
            visit = self._visit(lead, z0 + index[-1])
            start = (-visit * self._plane) % _PERCENTILE_STRIDE
            sample = plane[start::_PERCENTILE_STRIDE].astype(np.float32)
            left_out = 0
            if plane.dtype.kind == "f":  # NaN or infinite voxels would make every figure NaN
                finite = np.isfinite(plane)
                left_out = plane.size - int(np.count_nonzero(finite))
                if left_out:
                    plane = plane[finite]
                sample = sample[np.isfinite(sample)]  # float32 may overflow a float64 value
            self._planes[visit] = (
                *_plane_sums(plane, self._scratch),
                float(plane.min()) if plane.size else math.inf,
                float(plane.max()) if plane.size else -math.inf,
                sample,
                left_out,
            )

    def result(self) -> IntensityStats:
        """The figures of the finite voxels; all NaN when there is none."""
        count, total, total_sq, low, high, left_out = 0, 0.0, 0.0, math.inf, -math.inf, 0
        samples = []
        for visit in sorted(self._planes):
            plane_sum, plane_sq, plane_low, plane_high, sample, bad = self._planes[visit]
            count += self._plane - bad
            left_out += bad
            total += plane_sum
            total_sq += plane_sq
            low, high = min(low, plane_low), max(high, plane_high)
            samples.append(sample)
        nan = math.nan
        if count == 0:
            return IntensityStats(nan, nan, nan, nan, nan, nan, nan, non_finite=left_out)
        mean = total / count
        var = max(total_sq / count - mean * mean, 0.0)
        sampled = np.concatenate(samples)
        p01, p50, p99 = (
            (float(v) for v in np.percentile(sampled, [1, 50, 99])) if sampled.size else (nan,) * 3
        )
        return IntensityStats(low, high, mean, var**0.5, p01, p50, p99, non_finite=left_out)


def _plane_sums(plane: np.ndarray, scratch: _Scratch | None = None) -> tuple[float, float]:
    """Sum and sum of squares of a flat plane, exact for integers of up to 16 bits.

    Those are copied, 2^20 values at a time, into a reused float64 buffer and summed
    there: every partial sum is an integer below 2^52, which float64 holds exactly in
    any summation order, so the figures are the exact integer sums. About 1.6x cheaper
    than numpy's int64 ``sum`` and ``einsum`` (which convert value by value); a fresh
    2 MB float64 copy per plane made the whole volume stage 1.7x slower
    (docs/performance.md). Not BLAS (``np.dot``): OpenBLAS threads a long dot product
    and its threads spin on every core outside Dask's workers.
    """
    if plane.dtype.kind not in "iu" or plane.dtype.itemsize > 2:
        values = plane.astype(np.float64)
        return float(values.sum()), float(np.dot(values, values))
    scratch = scratch or _Scratch()
    total = squares = 0
    for start in range(0, plane.size, _EXACT_BLOCK):
        block = plane[start : start + _EXACT_BLOCK]
        values = scratch.take(block.size)
        np.copyto(values, block)
        total += int(np.add.reduce(values))
        squares += int(np.einsum("i,i->", values, values))
    return float(total), float(squares)


#: Values summed at once in :func:`_plane_sums`: 2^20 squares of 16-bit integers (each
#: below 2^32) sum below 2^52, where float64 is exact.
_EXACT_BLOCK = 1 << 20


class _Scratch:
    """A float64 buffer, grown on demand and reused plane after plane."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values = np.empty(0)

    def take(self, size: int) -> np.ndarray:
        if self._values.size < size:
            self._values = np.empty(size)
        return self._values[:size]


def _compressors(config: StoreConfig) -> Any:
    from zarr.codecs import BloscCodec, ZstdCodec

    if config.codec == "zstd":
        return ZstdCodec(level=config.clevel)
    if config.codec == "blosc-lz4":
        return BloscCodec(cname="lz4", clevel=config.clevel, shuffle="shuffle")
    return BloscCodec(cname="zstd", clevel=config.clevel, shuffle="shuffle")


class VolumeWriter:
    """Stream one volume into the store.

    Parameters
    ----------
    store_url
        Root of the volume store (local path, ``file://`` or ``s3://`` URL).
    path
        Group path inside the store (:func:`voxlake.volumes.layout.volume_path`).
    shape, dtype
        Array shape ((z, y, x), (t, z, y, x) or (c, z, y, x)) and dtype.
    axes
        Axis names of ``shape`` (``"zyx"``, ``"tzyx"``, ``"czyx"``); default ``zyx`` or
        ``tzyx`` by dimension. A leading ``c`` (colour channels) is never downsampled
        and gets one chunk per channel.
    config
        Chunk / shard / codec policy.
    storage_options
        fsspec options for remote stores.
    """

    def __init__(
        self,
        store_url: str | os.PathLike[str],
        path: str,
        *,
        shape: tuple[int, ...],
        dtype: np.dtype[Any] | str,
        config: StoreConfig | None = None,
        storage_options: dict[str, Any] | None = None,
        levels: int = 0,
        axes: str | None = None,
    ) -> None:
        import zarr

        self.axes = axes or "tzyx"[-len(shape) :]
        self.levels = int(levels)
        self._level1: list[np.ndarray] = []
        self.store_url = os.fspath(store_url)
        self.path = path
        self.config = config or StoreConfig()
        self.layout: ArrayLayout = choose_layout(tuple(shape), self.config, axes=self.axes)
        self.dtype = np.dtype(dtype)
        self._local = is_local_url(self.store_url)
        self._stats = _StatsAccumulator(self.layout.shape, self.layout.shards[-3])
        self._written_rows = 0
        self._carry: np.ndarray | None = None  # a slice waiting for its pyramid pair
        if self._local:
            root = strip_file_scheme(self.store_url)
            self._staging = os.path.join(root, ".staging", uuid.uuid4().hex)
            os.makedirs(self._staging, exist_ok=True)
            self._store: Any = zarr.storage.LocalStore(self._staging)
            self._group_path = ""
        else:
            self._staging = ""
            self._store = open_store(self.store_url, storage_options=storage_options)
            self._group_path = path
        name = join_url(self._group_path, "0").lstrip("/")
        try:
            reused = (
                None if self._local else _same_array(self._store, name, self.layout, self.dtype)
            )
            self._array = reused or zarr.create_array(
                self._store,
                name=name,
                shape=self.layout.shape,
                dtype=self.dtype,
                chunks=self.layout.chunks,
                shards=self.layout.shards,
                compressors=_compressors(self.config),
                fill_value=0,
                dimension_names=tuple(self.axes),
                overwrite=True,
            )
        except Exception as exc:
            self.abort()
            raise StoreError(f"cannot create volume array: {exc}") from exc
        self._shards = ShardWriter(self._array) if ShardedReader.supports(self._array) else None

    @property
    def slab_depth(self) -> int:
        """Slices per :meth:`write_slab` call that fill whole chunk layers."""
        return self.layout.slab_depth

    def write_slab(self, z0: int, data: np.ndarray) -> None:
        """Write ``data`` (dz, y, x) or (t, dz, y, x) starting at slice ``z0``.

        Slabs come in order (``z0`` is the number of slices written so far); any depth
        works, :attr:`slab_depth` (one chunk layer) keeps the least in memory.
        """
        if data.dtype != self.dtype:
            raise StoreError(f"slab dtype {data.dtype} differs from volume dtype {self.dtype}")
        shape, depth = self.layout.shape, data.shape[-3]
        if data.ndim != len(shape) or data.shape[:-3] + data.shape[-2:] != shape[:-3] + shape[-2:]:
            raise StoreError(f"slab shape {data.shape} does not fit volume shape {shape}")
        if z0 != self._written_rows or z0 + depth > shape[-3]:
            raise StoreError(
                f"slab of slices {z0} to {z0 + depth} out of order: "
                f"{self._written_rows} of {shape[-3]} slices written"
            )
        if self._shards is not None:
            self._shards.add(z0, data)
        elif len(shape) == 4:
            self._array[:, z0 : z0 + depth] = data
        else:
            self._array[z0 : z0 + depth] = data
        self._stats.add(z0, data)
        self._written_rows += depth
        if self.levels:
            self._pool(z0, data)

    def _pool(self, z0: int, data: np.ndarray) -> None:
        """Pool level 1 as it comes, exactly as pooling each shard layer whole would.

        Pairs of slices are pooled from the start of each shard layer (a layer of odd
        depth ends with its last slice padded), so a slice of an odd-sized slab waits for
        its pair. The pyramid costs 1/8 of the volume in memory, never the whole volume.
        """
        if self._carry is not None:
            data = np.concatenate([self._carry, data], axis=-3)
            z0, self._carry = z0 - 1, None
        layer, n_z, done = self.layout.shards[-3], self.layout.shape[-3], 0
        while done < data.shape[-3]:
            z = z0 + done
            stop = min(z - z % layer + layer, n_z)
            piece = data[..., done : min(stop - z0, data.shape[-3]), :, :]
            done += piece.shape[-3]
            if z + piece.shape[-3] < stop and piece.shape[-3] % 2:
                self._carry = piece[..., -1:, :, :].copy()
                piece = piece[..., :-1, :, :]
            if piece.shape[-3]:
                self._level1.append(downsample2(piece))

    def commit(self, attributes: Mapping[str, Any]) -> WriteResult:
        """Write the group metadata last and make the volume visible at its final path."""
        import zarr

        expected = self.layout.shape[-3]
        if self._written_rows != expected:
            self.abort()
            raise StoreError(
                f"volume incomplete: wrote {self._written_rows} of {expected} slices",
                code="incomplete_volume",
            )
        stats = self._stats.result()
        spacing = tuple(attributes.get("spacing", (1.0, 1.0, 1.0)))
        if self.levels:
            self._write_levels()
        attrs: dict[str, Any] = {
            "ome": ome_multiscales(
                str(attributes.get("volume_id", "volume")),
                spacing,
                ndim=len(self.layout.shape),
                time_step=attributes.get("time_step"),
                levels=self.levels,
                axes=self.axes,
            ),
            "voxlake": {**attributes, "stats": stats.__dict__, "complete": True},
        }
        try:
            group = zarr.open_group(self._store, path=self._group_path, mode="a")
            group.attrs.update(attrs)
            stored = _stored_bytes(self._store, self._group_path)
            if self._local:
                self._publish_local()
        except StoreError:
            raise
        except Exception as exc:
            self.abort()
            raise StoreError(f"cannot commit volume: {exc}") from exc
        return WriteResult(
            store_url=self.store_url,
            path=self.path,
            shape=self.layout.shape,
            dtype=str(self.dtype),
            chunks=self.layout.chunks,
            shards=self.layout.shards,
            nbytes=int(np.prod(self.layout.shape)) * self.dtype.itemsize,
            stored_bytes=stored,
            stats=stats,
        )

    def _write_levels(self) -> None:
        import zarr

        axis = -3
        level = np.concatenate(self._level1, axis=axis)
        self._level1 = []
        for number in range(1, self.levels + 1):
            layout = choose_layout(level.shape, self.config, axes=self.axes)
            array = zarr.create_array(
                self._store,
                name=join_url(self._group_path, str(number)).lstrip("/"),
                shape=level.shape,
                dtype=level.dtype,
                chunks=layout.chunks,
                shards=layout.shards,
                compressors=_compressors(self.config),
                fill_value=0,
                dimension_names=tuple(self.axes),
                overwrite=True,
            )
            array[...] = level
            if number < self.levels:
                level = downsample2(level)

    def _publish_local(self) -> None:
        final = os.path.join(strip_file_scheme(self.store_url), *self.path.split("/"))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        try:
            os.rename(self._staging, final)
        except OSError:
            if os.path.isdir(final):
                # Same revision already published (content-addressed): keep it.
                shutil.rmtree(self._staging, ignore_errors=True)
            else:
                raise

    def abort(self) -> None:
        """Drop what was staged (local stores); remote partial data stays invisible."""
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)


def _same_array(store: Any, name: str, layout: ArrayLayout, dtype: np.dtype[Any]) -> Any:
    """The array at ``name`` when it exists with exactly this shape, dtype and chunking.

    On object stores two writers of one revision (concurrent ingests) write identical
    bytes. Re-creating the array would delete the chunks the first one wrote, under a
    group whose catalog row may already be committed (readers would get zeros), so an
    identical array is written into, not replaced.
    """
    import zarr

    try:
        array = zarr.open_array(store, path=name, mode="r+")
    except Exception:
        return None
    same = (
        tuple(array.shape) == layout.shape
        and array.dtype == dtype
        and tuple(array.chunks) == layout.chunks
        and tuple(array.shards or ()) == layout.shards
    )
    return array if same else None


def _stored_bytes(store: Any, prefix: str) -> int:
    import zarr.storage

    if isinstance(store, zarr.storage.LocalStore):
        root = os.path.join(str(store.root), prefix)
        return sum(
            os.path.getsize(os.path.join(dirpath, name))
            for dirpath, _, names in os.walk(root)
            for name in names
        )
    fs = getattr(store, "fs", None)
    base = getattr(store, "path", "")
    if fs is None:
        return 0
    try:
        return int(fs.du(join_url(base, prefix), total=True))
    except Exception:
        return 0


def write_volume(
    store_url: str | os.PathLike[str],
    path: str,
    data: np.ndarray,
    *,
    attributes: Mapping[str, Any],
    config: StoreConfig | None = None,
    storage_options: dict[str, Any] | None = None,
    axes: str | None = None,
) -> WriteResult:
    """Write an in-memory volume in one call (slab by slab underneath).

    ``attributes`` should hold at least ``volume_id``, ``spacing`` (z, y, x in mm) and
    ``affine`` (4x4 RAS, row-major nested lists). ``axes`` names the axes of ``data``
    (``"czyx"`` for colour channels first; default ``zyx`` / ``tzyx``).
    """
    writer = VolumeWriter(
        store_url,
        path,
        shape=data.shape,
        dtype=data.dtype,
        config=config,
        storage_options=storage_options,
        axes=axes,
    )
    depth = writer.slab_depth
    for z0 in range(0, data.shape[-3], depth):
        writer.write_slab(z0, data[..., z0 : z0 + depth, :, :])
    return writer.commit(attributes)
