"""The base of voxlake's zarr store wrappers (counting, caching, retrying reads)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zarr.abc.store import Store
from zarr.storage import WrapperStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from zarr.abc.store import ByteRequest
    from zarr.core.buffer import Buffer, BufferPrototype

__all__ = ["ReadWrapper"]


class ReadWrapper(WrapperStore[Any]):
    """A ``WrapperStore`` whose reads all go through its own ``get``.

    zarr 3.2 added ``Store.get_ranges`` (byte ranges of one key, coalesced), which the
    sharding codec reads chunks with, and its ``WrapperStore`` forwards that to the
    wrapped store, past the wrapper's ``get``: what a wrapper counts, caches or retries
    would then miss every chunk read. Here ``get_ranges`` is ``Store``'s own
    implementation, the coalescer over ``self.get``, so it goes through the wrapper (on
    zarr 3.1, which has no ``get_ranges``, nothing calls it).

    ``coalesce = False`` reads each range on its own (a cache keeps chunks, and a merged
    range of several chunks would only serve that same read again).
    """

    coalesce = True

    async def get_ranges(
        self,
        key: str,
        byte_ranges: Sequence[ByteRequest | None],
        *,
        prototype: BufferPrototype,
        **options: int | None,
    ) -> AsyncIterator[Sequence[tuple[int, Buffer | None]]]:
        coalesced = getattr(Store, "get_ranges")  # noqa: B009 (absent from zarr 3.1's typing)
        given = {name: value for name, value in options.items() if value is not None}
        if not self.coalesce:
            given["max_gap_bytes"] = -1  # no two ranges are that close: none merge
        async for group in coalesced(self, key, byte_ranges, prototype=prototype, **given):
            yield group
