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
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from voxlake.training.patches import patch_origin, sample_seed
from voxlake.training.transforms import augment, resize

if TYPE_CHECKING:
    from voxlake.training.datasets import VolumeStream
    from voxlake.volumes.foreground import ForegroundIndex

__all__ = [
    "ReadOptions",
    "VolumeReader",
    "normalize_array",
    "prefetched",
    "read_stream_sample",
]

logger = logging.getLogger(__name__)

V = TypeVar("V")
T = TypeVar("T")


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
    """

    storage_options: dict[str, Any] | None = None
    retries: int = 5
    cache_bytes: int = 0
    wrap_store: Callable[[Any], Any] | None = None


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
        self._warned_foreground = False

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


def normalize_array(
    data: np.ndarray,
    method: str,
    *,
    mean: float = np.nan,
    std: float = np.nan,
    window: tuple[float, float] = (40.0, 400.0),
) -> np.ndarray:
    """``data`` as float32, z-scored, CT-windowed to [0, 1], or raw (``"none"``).

    Works in one output buffer (the conversion and the arithmetic are fused into two
    passes), which matters for whole-volume throughput. ``zscore`` needs finite
    ``mean`` and ``std > 0``; the caller supplies fallbacks.
    """
    out = np.empty(data.shape, dtype=np.float32)
    if method == "zscore":
        np.subtract(data, np.float32(mean), out=out, dtype=np.float32, casting="unsafe")
        out *= np.float32(1.0 / max(float(std), 1e-6))
    elif method == "ct_window":
        center, width = window
        low = np.float32(center - width / 2.0)
        np.subtract(data, low, out=out, dtype=np.float32, casting="unsafe")
        out *= np.float32(1.0 / width)
        np.clip(out, 0.0, 1.0, out=out)
    else:
        out[...] = data
    return out


def prefetched(read: Callable[[int], T], items: Iterable[int], depth: int) -> Iterator[T]:
    """``read(item)`` for each item, in order, computed by ``depth`` threads ahead.

    ``depth == 0`` reads in the calling thread. Closing the generator early (break, error)
    cancels the reads nobody will consume instead of waiting for them.
    """
    if depth == 0:
        for item in items:
            yield read(item)
        return
    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="voxlake-read")
    pending: deque[Future[T]] = deque()
    upcoming = iter(items)
    try:
        for item in upcoming:
            pending.append(pool.submit(read, item))
            if len(pending) > depth:
                break
        while pending:
            result = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(read, following))
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _stats_ok(mean: float, std: float) -> bool:
    return bool(np.isfinite(mean) and np.isfinite(std) and std > 0)


def read_stream_sample(stream: VolumeStream, sample: int, reader: VolumeReader) -> dict[str, Any]:
    """Sample number ``sample`` of ``stream``'s current epoch (see ``VolumeStream``)."""
    index = sample // stream.patches_per_volume
    code, path = int(stream._store_codes[index]), stream._paths[index]
    array = reader.array(code, path)
    mean, std = float(stream._means[index]), float(stream._stds[index])
    method, window = stream.normalize, stream.window
    item: dict[str, Any] = {}
    if stream.mode == "volume":
        data = np.asarray(array[0] if array.ndim == 4 else array[...])
        if method == "zscore" and not _stats_ok(mean, std):
            mean, std = float(data.mean(dtype=np.float64)), float(data.std(dtype=np.float64))
        image = torch.from_numpy(normalize_array(data, method, mean=mean, std=std, window=window))
        image = resize(image.unsqueeze(0), stream.shape).contiguous()
    else:
        from voxlake.volumes.patches import read_patch

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
        data, pad = read_patch(array, origin, stream.patch_size)
        if method == "zscore" and not _stats_ok(mean, std):
            mean, std = reader.stored_stats(code, path)
            if not _stats_ok(mean, std):
                mean, std = float(data.mean(dtype=np.float64)), float(data.std(dtype=np.float64))
        out = normalize_array(data, method, mean=mean, std=std, window=window)
        image = torch.from_numpy(out).unsqueeze(0)
        if any(p for pair in pad for p in pair):
            widths = [p for pair in reversed(pad) for p in pair]  # F.pad: last axis first
            image = F.pad(image, widths, value=0.0)
        item["origin"] = torch.tensor(origin, dtype=torch.int64)
    item.update(
        {"image": image, "volume_id": stream._volume_ids[index], "index": index, "sample": sample}
    )
    if stream._labels is not None:
        item["label"] = torch.tensor(stream._labels[index], dtype=torch.float32)
    if stream.augment is not None:
        seed = sample_seed(stream.seed, stream.epoch, sample, "augment")
        item = augment(item, torch.Generator().manual_seed(seed), stream.augment)
    if stream.transform is not None:
        item = stream.transform(item)
    return item
