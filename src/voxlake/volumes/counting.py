"""A zarr store wrapper that counts what is read: requests and bytes, per key.

Used by the tests that check a random patch reads only the chunks it touches, and by
``benchmarks/stream.py`` to report read amplification. It counts the bytes the wrapped
store *returned* (a ranged request counts only its range), which for an object store is
what crossed the network.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING

from voxlake.volumes._wrapper import ReadWrapper

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Iterable

    from zarr.abc.store import ByteRequest, Store
    from zarr.core.buffer import Buffer, BufferPrototype

__all__ = ["CountingStore"]


class CountingStore(ReadWrapper):
    """Wrap a zarr store and count the requests and bytes of every read.

    Parameters
    ----------
    store
        The store to wrap (any zarr v3 store, e.g. ``LocalStore`` or ``FsspecStore``).

    Attributes
    ----------
    requests
        Reads (``get`` calls and ranges of ``get_partial_values``) that returned data.
    bytes_read
        Bytes returned by those reads.
    by_key
        Bytes read per store key (``"<volume>/0/c/1/0/0"``, ``".../zarr.json"``).

    Notes
    -----
    Counters are shared by copies made with ``with_read_only`` and are safe to update
    from several threads. Call :meth:`reset` to start a new measurement.
    """

    def __init__(self, store: Store, *, _counters: _Counters | None = None) -> None:
        super().__init__(store)
        self._counters = _counters if _counters is not None else _Counters()

    def _with_store(self, store: Store) -> CountingStore:
        return type(self)(store, _counters=self._counters)

    def __repr__(self) -> str:
        return f"CountingStore({self._store!r}, requests={self.requests})"

    @property
    def requests(self) -> int:
        return self._counters.requests

    @property
    def bytes_read(self) -> int:
        return self._counters.bytes_read

    @property
    def by_key(self) -> dict[str, int]:
        with self._counters.lock:
            return dict(self._counters.by_key)

    def reset(self) -> None:
        """Set every counter back to zero."""
        self._counters.reset()

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        value: Buffer | None = await self._store.get(key, prototype, byte_range)
        if value is not None:
            self._counters.add(key, len(value))
        return value

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        values: list[Buffer | None] = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values, strict=True):
            if value is not None:
                self._counters.add(key, len(value))
        return values

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        # Route through get() so nothing bypasses the counters.
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes_read = 0
        self.by_key: Counter[str] = Counter()

    def add(self, key: str, nbytes: int) -> None:
        with self.lock:
            self.requests += 1
            self.bytes_read += nbytes
            self.by_key[key] += nbytes

    def reset(self) -> None:
        with self.lock:
            self.requests = 0
            self.bytes_read = 0
            self.by_key.clear()
