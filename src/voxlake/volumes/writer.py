"""Write one volume to the OME-Zarr store, whole or not at all.

:class:`VolumeWriter` receives a volume slab by slab (one shard layer at a time), so a
worker never needs the whole volume in memory, accumulates intensity statistics on the
way, and makes the volume visible only at :meth:`VolumeWriter.commit`:

- local stores: the group is written under ``<store>/.staging/<uuid>`` and renamed into
  place (atomic on POSIX); if the final path already exists it holds the identical
  revision (revisions are content digests), so the staging copy is dropped.
- object stores: chunks and the array metadata go first, the group's ``voxlake.complete``
  attribute last. Readers only reach volumes through committed catalog rows anyway.
"""

from __future__ import annotations

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
    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.low = np.inf
        self.high = -np.inf
        self.samples: list[np.ndarray] = []
        self._offset = 0

    def add(self, data: np.ndarray) -> None:
        # Slice by slice: converting a whole slab to float64 would cost 4x its int16 size.
        planes = data.reshape(-1, *data.shape[-2:]) if data.ndim >= 2 else data.reshape(1, -1)
        for plane in planes:
            values = plane.reshape(-1).astype(np.float64)
            if values.size == 0:
                continue
            self.count += values.size
            self.total += float(values.sum())
            self.total_sq += float(np.dot(values, values))
            self.low = min(self.low, float(values.min()))
            self.high = max(self.high, float(values.max()))
            start = (-self._offset) % _PERCENTILE_STRIDE
            self.samples.append(values[start::_PERCENTILE_STRIDE].astype(np.float32))
            self._offset += values.size

    def result(self) -> IntensityStats:
        if self.count == 0:
            nan = float("nan")
            return IntensityStats(nan, nan, nan, nan, nan, nan, nan)
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        sample = np.concatenate(self.samples)
        p01, p50, p99 = (float(v) for v in np.percentile(sample, [1, 50, 99]))
        return IntensityStats(self.low, self.high, mean, var**0.5, p01, p50, p99)


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
        self._stats = _StatsAccumulator()
        self._written_rows = 0
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

    @property
    def slab_depth(self) -> int:
        """Slices per :meth:`write_slab` call that fill whole shards."""
        return self.layout.slab_depth

    def write_slab(self, z0: int, data: np.ndarray) -> None:
        """Write ``data`` (dz, y, x) or (t, dz, y, x) starting at slice ``z0``."""
        if data.dtype != self.dtype:
            raise StoreError(f"slab dtype {data.dtype} differs from volume dtype {self.dtype}")
        depth = data.shape[-3]
        if len(self.layout.shape) == 4:
            self._array[:, z0 : z0 + depth] = data
        else:
            self._array[z0 : z0 + depth] = data
        self._stats.add(data)
        self._written_rows += depth
        if self.levels:
            # Level 1 is pooled slab by slab (slabs hold whole pairs of slices), so the
            # pyramid costs 1/8 of the volume in memory, never the whole volume.
            self._level1.append(downsample2(data))

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
    nz = data.shape[-3]
    for z0 in range(0, nz, depth):
        slab = data[..., z0 : z0 + depth, :, :]
        writer.write_slab(z0, np.ascontiguousarray(slab))
    return writer.commit(attributes)
