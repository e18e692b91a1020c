"""A local, byte-capped LRU cache of store reads (chunks, shard indexes, metadata).

Volumes are immutable once written (a revision is a content digest and a rebuilt volume
gets a new path), so what a read returned can be served again without asking the store:
no invalidation is needed. The cache lives in the memory of the process that reads, i.e.
one cache per DataLoader worker; its cap bounds each worker's cache.

Entries are keyed by (store key, byte range): with sharded arrays a patch reads each chunk
as a ranged request, so repeated patches of the same volume hit the cache chunk by chunk.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from voxlake.volumes._wrapper import ReadWrapper

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Hashable, Iterable

    from zarr.abc.store import ByteRequest, Store
    from zarr.core.buffer import Buffer, BufferPrototype

__all__ = ["CacheStats", "CachingStore", "ChunkCache"]


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`ChunkCache`."""

    hits: int
    misses: int
    evictions: int
    entries: int
    nbytes: int
    max_bytes: int


class ChunkCache:
    """Least-recently-used mapping of byte strings whose total size stays within a cap.

    Parameters
    ----------
    max_bytes
        Cap on the sum of the cached values' sizes. A value larger than the cap is never
        cached. ``0`` disables caching.

    Notes
    -----
    Thread-safe. The cap counts payload bytes (not the few hundred bytes of bookkeeping
    per entry).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()
        self._nbytes = 0
        self._hits = self._misses = self._evictions = 0

    def get(self, key: Hashable) -> bytes | None:
        """The cached value (marking it most recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: Hashable, value: bytes) -> None:
        """Cache ``value``, evicting least recently used entries to stay under the cap."""
        size = len(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= len(old)
            while self._entries and self._nbytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._nbytes -= len(evicted)
                self._evictions += 1
            self._entries[key] = value
            self._nbytes += size

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes currently cached (always ``<= max_bytes``)."""
        return self._nbytes

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                nbytes=self._nbytes,
                max_bytes=self.max_bytes,
            )


class CachingStore(ReadWrapper):
    """Serve repeated reads of a read-only zarr store from a :class:`ChunkCache`.

    Parameters
    ----------
    store
        The store to wrap; only reads go through the cache (writes are refused by the
        read-only stores the stream opens, and would not be cached).
    cache
        The cache (may be shared by several wrappers), or None for a new one of
        ``max_bytes``.
    max_bytes
        Cap of the new cache when ``cache`` is None.
    """

    coalesce = False  # cached chunk by chunk

    def __init__(
        self, store: Store, cache: ChunkCache | None = None, *, max_bytes: int = 256 << 20
    ) -> None:
        super().__init__(store)
        self.cache = cache if cache is not None else ChunkCache(max_bytes)

    def _with_store(self, store: Store) -> CachingStore:
        return type(self)(store, self.cache)

    def __repr__(self) -> str:
        return f"CachingStore({self._store!r}, max_bytes={self.cache.max_bytes})"

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        # Byte requests are frozen dataclasses, so (key, range) is hashable.
        cache_key = (key, byte_range)
        hit = self.cache.get(cache_key)
        if hit is not None:
            return prototype.buffer.from_bytes(hit)
        value: Buffer | None = await self._store.get(key, prototype, byte_range)
        if value is not None:
            self.cache.put(cache_key, value.to_bytes())
        return value

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)
