"""Per-process read side of :class:`~voxlake.training.VolumeStream`.

A :class:`VolumeReader` opens stores lazily in the process that reads (a DataLoader
worker) and keeps, for that process only: the stores (raw store, then optional
instrumentation wrapper, retries, chunk cache), opened arrays (their metadata) and
class-location indexes. It is never pickled: the stream drops it when it is sent to a
worker and a fork is detected by process id.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from voxlake.training._output import (
    BufferPool,
    normalization_params,
    normalize_array,
    normalizer,
    output_tensor,
    prefetched,
)
from voxlake.training.patches import patch_origin, sample_seed
from voxlake.training.transforms import augment, resize

if TYPE_CHECKING:
    from voxlake.training.datasets import VolumeStream
    from voxlake.volumes.foreground import ForegroundIndex
    from voxlake.volumes.sharded import Emit, ShardedReader

__all__ = [
    "ReadOptions",
    "VolumeReader",
    "normalize_array",
    "normalizer",
    "output_tensor",
    "prefetched",
    "read_stream_sample",
]

logger = logging.getLogger(__name__)

V = TypeVar("V")


@dataclass(frozen=True)
class ReadOptions:
    """How a stream reaches its stores (picklable; shipped to every worker).

    Attributes
    ----------
    storage_options
        fsspec options for remote stores.
    retries
        Read attempts in total on transient errors (1: no retry).
    cache_bytes
        Cap of the per-process chunk cache in bytes (0: no cache).
    wrap_store
        Called with each raw store before retries and the cache are added (e.g.
        :class:`voxlake.volumes.counting.CountingStore` to measure what is fetched).
    lean
        Read the writer's sharded layout with :class:`voxlake.volumes.sharded.
        ShardedReader` (zarr reads other layouts, and everything when False).
    decode_threads
        Threads decoding chunks per process (lean path).
    reuse_buffers
        Private image buffers kept per process for reuse once released
        (:class:`voxlake.training._output.BufferPool`; 0: a fresh image per sample).
    """

    storage_options: dict[str, Any] | None = None
    retries: int = 5
    cache_bytes: int = 0
    wrap_store: Callable[[Any], Any] | None = None
    lean: bool = True
    decode_threads: int = 2
    reuse_buffers: int = 0


class _Lru:
    """A small thread-safe LRU mapping with a cap on the number of entries."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get_or_create(self, key: Hashable, create: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]  # type: ignore[no-any-return]
        value = create()  # outside the lock: may do I/O
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


class VolumeReader:
    """Stores, arrays and foreground indexes of one process, opened on first use.

    Parameters
    ----------
    urls
        Store URLs, addressed by their position (the stream's store codes).
    options
        How to open them.
    """

    def __init__(self, urls: list[str], options: ReadOptions) -> None:
        self.urls = urls
        self.options = options
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._stores: dict[int, Any] = {}
        self._arrays = _Lru(512)
        self._foreground = _Lru(256)
        self._stats = _Lru(4096)
        self._lean = _Lru(512)
        self._axes = _Lru(4096)
        self._pool: ThreadPoolExecutor | None = None
        self._warned_foreground = False
        self.buffers = BufferPool(options.reuse_buffers)

    def store(self, code: int) -> Any:
        """The (wrapped) store of URL number ``code``."""
        with self._lock:
            if code not in self._stores:
                self._stores[code] = self._open(self.urls[code])
            return self._stores[code]

    def _open(self, url: str) -> Any:
        from voxlake.volumes import open_store
        from voxlake.volumes.cache import CachingStore
        from voxlake.volumes.retry import RetryingStore, RetryPolicy

        opts = self.options
        store = open_store(url, storage_options=opts.storage_options, read_only=True)
        if opts.wrap_store is not None:
            store = opts.wrap_store(store)
        if opts.retries > 1:
            store = RetryingStore(store, RetryPolicy(attempts=opts.retries))
        if opts.cache_bytes > 0:
            store = CachingStore(store, max_bytes=opts.cache_bytes)
        return store

    def array(self, code: int, path: str) -> Any:
        """Array ``0`` of the volume at ``path`` (metadata read once per process)."""
        from voxlake.volumes import open_volume

        return self._arrays.get_or_create((code, path), lambda: open_volume(self.store(code), path))

    def lean(self, code: int, path: str) -> ShardedReader | None:
        """The lean sharded reader of the volume's array, or None (zarr reads it)."""
        from voxlake.volumes.sharded import ShardedReader

        def create() -> ShardedReader | None:
            array = self.array(code, path)
            if not self.options.lean or not ShardedReader.supports(array):
                return None
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self.options.decode_threads, thread_name_prefix="voxlake-decode"
                    )
                pool = self._pool
            # With a chunk cache, fetch chunk by chunk so the cache holds reusable chunks.
            return ShardedReader(array, pool=pool, coalesce=self.options.cache_bytes == 0)

        reader: ShardedReader | None = self._lean.get_or_create((code, path), create)
        return reader

    def axes(self, code: int, path: str) -> tuple[str, ...]:
        """Axis names of array ``0`` from the group's OME ``multiscales`` metadata.

        Falls back to (z, y, x) / (t, z, y, x) by rank when the metadata is absent.
        """

        def load() -> tuple[str, ...]:
            import zarr

            ndim = self.array(code, path).ndim
            try:
                group = zarr.open_group(self.store(code), path=path.strip("/"), mode="r")
                ome: Any = group.attrs.get("ome", {})
                axes = ome["multiscales"][0]["axes"]
                names = tuple(str(a["name"]) for a in axes)
            except Exception:
                names = ()
            if len(names) != ndim:
                names = ("z", "y", "x") if ndim == 3 else ("t", "z", "y", "x")[-ndim:]
            return names

        names: tuple[str, ...] = self._axes.get_or_create((code, path), load)
        return names

    def foreground(self, code: int, path: str) -> ForegroundIndex | None:
        """The volume's class-location index, or None (warned about once per process)."""
        from voxlake.volumes.foreground import read_foreground_index

        index = self._foreground.get_or_create(
            (code, path), lambda: read_foreground_index(self.store(code), path)
        )
        if index is None and not self._warned_foreground:
            self._warned_foreground = True
            logger.warning(
                "volume %s has no foreground index (voxlake.volumes.foreground."
                "write_foreground_index): its patches are sampled uniformly",
                path,
            )
        return index

    def stored_stats(self, code: int, path: str) -> tuple[float, float]:
        """(mean, std) recorded by the writer in the group attributes (NaN if absent)."""

        def load() -> tuple[float, float]:
            from voxlake.volumes import volume_attributes

            try:
                stats = volume_attributes(self.store(code), path).get("stats", {})
                return float(stats.get("mean", np.nan)), float(stats.get("std", np.nan))
            except Exception:
                return np.nan, np.nan

        result: tuple[float, float] = self._stats.get_or_create((code, path), load)
        return result


def _stats_ok(mean: float, std: float) -> bool:
    return bool(np.isfinite(mean) and np.isfinite(std) and std > 0)


def _region(axes: tuple[str, ...], spatial: tuple[slice, slice, slice]) -> tuple[Any, ...]:
    """Selection of a (z, y, x) box across all channels at the first time point."""
    place = {"z": spatial[0], "y": spatial[1], "x": spatial[2]}
    return tuple(place.get(name, 0 if name == "t" else slice(None)) for name in axes)


def _channels(array: Any, axes: tuple[str, ...]) -> int:
    return int(array.shape[axes.index("c")]) if "c" in axes else 1


def _fill(
    reader: VolumeReader,
    code: int,
    path: str,
    spatial: tuple[slice, slice, slice],
    out: np.ndarray,
    *,
    method: str,
    window: tuple[float, float],
    stats: Callable[[np.ndarray | None], tuple[float, float]],
    stored: bool = False,
) -> tuple[float, float]:
    """Read the (z, y, x) box ``spatial`` of every channel into ``out`` (C, d, h, w):
    normalised (float32 ``out``), or the stored values when ``stored``. Returns the
    (mean, std) of the normalisation. ``stats(None)`` gives (mean, std) without data or
    NaNs; then ``stats(raw)`` is asked with the raw values read first (two passes)."""
    array = reader.array(code, path)
    axes = reader.axes(code, path)
    region = _region(axes, spatial)
    target = out if "c" in axes else out[0]
    lean = reader.lean(code, path)

    def read(dest: np.ndarray, emit: Emit | None) -> None:
        if lean is not None:
            if emit is None:
                lean.read(region, dest)
            else:
                lean.read(region, dest, emit=emit)
        else:
            data = np.asarray(array[region])
            if emit is None:
                dest[...] = data
            else:
                emit(data, dest)

    mean, std = stats(None) if method == "zscore" else (np.nan, np.nan)
    if stored or (method == "zscore" and not _stats_ok(mean, std)):
        raw = target if stored else np.empty(target.shape, np.dtype(array.dtype))
        read(raw, None)
        if method == "zscore" and not _stats_ok(mean, std):
            mean, std = stats(raw)
        if not stored:
            normalizer(method, mean=mean, std=std, window=window)(raw, target)
        return mean, std
    read(target, normalizer(method, mean=mean, std=std, window=window))
    return mean, std


def read_stream_sample(stream: VolumeStream, sample: int, reader: VolumeReader) -> dict[str, Any]:
    """Sample number ``sample`` of ``stream``'s current epoch (see ``VolumeStream``)."""
    index = sample // stream.patches_per_volume
    code, path = int(stream._store_codes[index]), stream._paths[index]
    array = reader.array(code, path)
    channels = _channels(array, reader.axes(code, path))
    catalog = float(stream._means[index]), float(stream._stds[index])
    method, window = stream.normalize, stream.window
    item: dict[str, Any] = {}
    spatial = tuple(int(n) for n in array.shape[-3:])
    # The image is sent as it is only when nothing replaces or batches it.
    shared = stream.batch_size == 1 and stream.augment is None and stream.transform is None
    stored = stream.output == "stored"
    dtype = np.dtype(array.dtype) if stored else np.dtype(np.float32)

    def own(data: np.ndarray) -> tuple[float, float]:
        return float(data.mean(dtype=np.float64)), float(data.std(dtype=np.float64))

    if stream.mode == "volume":

        def volume_stats(raw: np.ndarray | None) -> tuple[float, float]:
            return catalog if raw is None else own(raw)

        final = spatial == stream.shape  # no resize: the read buffer is the sample
        if stored and not final:
            raise ValueError(
                f"volume {stream._volume_ids[index]} is {spatial}, the stream's shape "
                f"{stream.shape}: output='stored' delivers volumes unresized; set shape to "
                "the stored size or use output='float32'"
            )
        image = output_tensor(
            (channels, *spatial), shared=shared and final, dtype=dtype, pool=reader.buffers
        )
        box = (slice(0, spatial[0]), slice(0, spatial[1]), slice(0, spatial[2]))
        mean, std = _fill(reader, code, path, box, image.numpy(), method=method,
                          window=window, stats=volume_stats, stored=stored)  # fmt: skip
        if not final:
            image = resize(image, stream.shape).contiguous()
    else:
        from voxlake.volumes.patches import patch_bounds

        def patch_stats(raw: np.ndarray | None) -> tuple[float, float]:
            if _stats_ok(*catalog):
                return catalog
            written = reader.stored_stats(code, path)
            if _stats_ok(*written) or raw is None:
                return written
            return own(raw)

        foreground = reader.foreground(code, path) if stream.sampler == "foreground" else None
        origin = patch_origin(
            array.shape,
            stream.patch_size,
            seed=stream.seed,
            epoch=stream.epoch,
            sample=sample,
            sampler=stream.sampler,
            foreground=foreground,
            foreground_prob=stream.foreground_prob,
        )
        slices, pad = patch_bounds(spatial, origin, stream.patch_size)
        padded = any(p for pair in pad for p in pair)
        image = output_tensor(
            (channels, *stream.patch_size),
            zero=padded,
            shared=shared,
            dtype=dtype,
            pool=reader.buffers,
        )
        inner = tuple(
            slice(lo, lo + s.stop - s.start) for (lo, _), s in zip(pad, slices, strict=True)
        )
        view = image.numpy()[(slice(None), *inner)]
        mean, std = _fill(reader, code, path, slices, view, method=method, window=window,
                          stats=patch_stats, stored=stored)  # fmt: skip
        item["origin"] = torch.tensor(origin, dtype=torch.int64)
        if stored:
            item["valid"] = torch.tensor([[s.start, s.stop] for s in inner], dtype=torch.int64)
    item.update(
        {"image": image, "volume_id": stream._volume_ids[index], "index": index, "sample": sample}
    )
    if stream._labels is not None:
        item["label"] = torch.tensor(stream._labels[index], dtype=torch.float32)
    if stored:
        params = normalization_params(method, mean=mean, std=std, window=window)
        item["normalization"] = torch.tensor(params, dtype=torch.float32)
    if stream.augment is not None:
        seed = sample_seed(stream.seed, stream.epoch, sample, "augment")
        item = augment(item, torch.Generator().manual_seed(seed), stream.augment)
    if stream.transform is not None:
        item = stream.transform(item)
    return item
