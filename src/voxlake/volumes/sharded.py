"""A lean read path for the store's sharded arrays: ranged fetches, threaded decoding.

zarr 3.1 reads a region of a sharded array chunk by chunk: one sequential request per
chunk inside a shard and a per-chunk pipeline of codec objects, which on small machines
costs more than the decompression itself. :class:`ShardedReader` reads the layout the
writer produces (blosc or zstd chunks inside shards whose index sits at the end) more
directly:

- each shard's index is read once and kept (volumes are immutable);
- the chunks a read touches are fetched as byte ranges of the shard, ranges adjacent in
  the file merged into one request, all shards' requests issued concurrently; a read that
  needs every chunk of a shard fetches the shard object whole (one request);
- chunks are decompressed by numcodecs (which releases the GIL) on a thread pool and
  written straight into the caller's output buffer through an optional ``emit`` function,
  so a stream can z-score into its float32 output without an intermediate int16 copy.

Fetches go through the zarr store the array was opened on, so store wrappers (byte
counting, retries, the chunk cache) see every request. Arrays whose codecs it does not
know (:meth:`ShardedReader.supports` is False) are read by zarr as before; the tests
check bit-exactness against zarr on every layout the writer produces.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["Emit", "ShardWriter", "ShardedReader", "copy_emit"]

#: ``emit(chunk_part, out_view)``: write a decoded chunk region into the output view.
Emit = Callable[[np.ndarray, np.ndarray], None]

_EMPTY = 2**64 - 1
# Merge byte ranges separated by at most this many bytes only when they are adjacent: a
# patch then fetches exactly the chunks it touches (the counting tests rely on it).
_MAX_GAP = 0


def copy_emit(part: np.ndarray, out: np.ndarray) -> None:
    """The default ``emit``: copy the decoded values unchanged."""
    out[...] = part


#: (store key, start, stop) of one request; see ``ShardedReader._get_many``.
_Request = tuple[str, int | None, int | None]


def _decoder(codec: Any) -> Callable[[memoryview, np.ndarray], None] | None:
    """``decode(payload, out)`` for a chunk codec the lean path handles, or None."""
    name = type(codec).__name__
    if name == "BloscCodec":
        from numcodecs import blosc

        def decode_blosc(payload: memoryview, out: np.ndarray) -> None:
            blosc.decompress(payload, out)

        return decode_blosc
    if name == "ZstdCodec" and not getattr(codec, "checksum", False):
        from numcodecs import Zstd

        zstd = Zstd()

        def decode_zstd(payload: memoryview, out: np.ndarray) -> None:
            zstd.decode(payload, out)

        return decode_zstd
    return None


def _setting(value: Any) -> str:
    """A codec setting as text: zarr 3.1 holds enums (``ShardingCodecIndexLocation.end``),
    zarr 3.2 and later plain strings (``"end"``); None stays empty."""
    if value is None:
        return ""
    return str(getattr(value, "value", value))


def _sharding(array: Any) -> Any:
    codecs: tuple[Any, ...] = tuple(getattr(array.metadata, "codecs", ()))
    if len(codecs) != 1 or type(codecs[0]).__name__ != "ShardingCodec":
        return None
    return codecs[0]


class _ShardedArray:
    """The geometry and storage location of one sharded array (reader and writer)."""

    def __init__(self, array: Any) -> None:
        sharding = _sharding(array)
        meta = array.metadata
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.chunks = tuple(int(n) for n in sharding.chunk_shape)
        self.shards = tuple(int(n) for n in meta.chunk_grid.chunk_shape)
        self.per_shard = tuple(s // c for s, c in zip(self.shards, self.chunks, strict=True))
        self.fill_value = self.dtype.type(meta.fill_value)
        self._codec = sharding.codecs[1]
        self._meta = meta
        store_path = array.store_path
        self._store = store_path.store
        self._root = _local_root(self._store)
        self._prefix = store_path.path.rstrip("/")

    def _key(self, shard: tuple[int, ...]) -> str:
        """The store key of the shard at grid coordinates ``shard``."""
        return f"{self._prefix}/{self._meta.encode_chunk_key(shard)}".lstrip("/")


class ShardedReader(_ShardedArray):
    """Read regions of one sharded zarr v3 array without zarr's per-chunk machinery.

    Parameters
    ----------
    array
        A ``zarr.Array`` for which :meth:`supports` is True.
    threads
        Decoding threads of the reader's own pool (ignored when ``pool`` is given).
    pool
        A thread pool to share between readers (e.g. one per process).
    coalesce
        Merge byte ranges adjacent in the shard into one request. Off when a chunk cache
        sits under the reader, so the cache holds chunks rather than per-read spans.
    """

    def __init__(
        self,
        array: Any,
        *,
        threads: int = 2,
        pool: ThreadPoolExecutor | None = None,
        coalesce: bool = True,
    ) -> None:
        if not self.supports(array):
            raise ValueError("array layout not handled by the lean reader; read it with zarr")
        super().__init__(array)
        self.coalesce = coalesce
        self._decode = _decoder(self._codec)
        self._count = int(np.prod(self.per_shard))
        self._index_bytes = 16 * self._count + 4
        self._indexes: dict[tuple[int, ...], np.ndarray | None] = {}
        self._lock = threading.Lock()
        self._scratch = threading.local()  # one decoded chunk per decoding thread
        self._pool = pool or ThreadPoolExecutor(threads, thread_name_prefix="voxlake-decode")

    @staticmethod
    def supports(array: Any) -> bool:
        """Whether the array has the layout this reader handles: one sharding codec with
        little-endian bytes and a blosc or zstd chunk codec inside, its index at the end
        (little-endian, CRC32C), on a regular grid with shards a whole number of chunks.
        """
        sharding = _sharding(array)
        if sharding is None:
            return False
        inner, index = sharding.codecs, sharding.index_codecs
        names = [type(c).__name__ for c in inner]
        if names[:1] != ["BytesCodec"] or len(names) != 2 or _decoder(inner[1]) is None:
            return False
        if [type(c).__name__ for c in index] != ["BytesCodec", "Crc32cCodec"]:
            return False
        if _setting(sharding.index_location) != "end":
            return False
        little = sys.byteorder == "little"
        endians = {_setting(getattr(c, "endian", None)) or "little" for c in inner[:1]}
        dtype = np.dtype(array.dtype)
        if dtype.kind not in "iufb" or not little or endians != {"little"}:
            return False
        grid: Any = getattr(array.metadata, "chunk_grid", None)
        # zarr 3.1 names it RegularChunkGrid, 3.2 and later RegularChunkGridMetadata.
        if type(grid).__name__ not in ("RegularChunkGrid", "RegularChunkGridMetadata"):
            return False
        return all(s % c == 0 for s, c in zip(grid.chunk_shape, sharding.chunk_shape, strict=True))

    # -- fetching --------------------------------------------------------------------------

    def _parse_index(self, tail: memoryview) -> np.ndarray:
        if len(tail) != self._index_bytes:
            raise OSError(f"shard index of {len(tail)} bytes, expected {self._index_bytes}")
        import google_crc32c

        body = bytes(tail[:-4])
        if google_crc32c.value(body) != int.from_bytes(tail[-4:], "little"):
            raise OSError("shard index checksum mismatch")
        return np.frombuffer(body, "<u8").reshape(*self.per_shard, 2)

    def _get_many(self, requests: list[_Request]) -> list[memoryview | None]:
        """Fetch ``(key, start, stop)`` byte ranges (``start`` None: a suffix of ``stop``
        bytes; both None: the whole object), concurrently; None where a key is missing."""
        if not requests:
            return []
        if self._root is not None:
            return [_pread(os.path.join(self._root, key), a, b) for key, a, b in requests]
        from zarr.core.sync import sync

        async def gather() -> list[memoryview | None]:
            return list(await asyncio.gather(*(self._get(*r) for r in requests)))

        return sync(gather())

    async def _get(self, key: str, start: int | None, stop: int | None) -> memoryview | None:
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest
        from zarr.core.buffer import default_buffer_prototype

        request: Any = None
        if start is not None and stop is not None:
            request = RangeByteRequest(start, stop)
        elif stop is not None:
            request = SuffixByteRequest(stop)
        value = await self._store.get(key, default_buffer_prototype(), request)
        # A view of the store's buffer: shard-sized reads are not copied again.
        return None if value is None else memoryview(value.as_numpy_array()).cast("B")

    def _fetch(
        self, by_shard: dict[tuple[int, ...], list[tuple[int, ...]]]
    ) -> list[tuple[tuple[int, ...], memoryview | None]]:
        """Payloads of the wanted chunks (global coordinates), shard by shard, in at most
        two rounds of concurrent requests: unknown indexes (or whole shards), then ranges."""
        out: list[tuple[tuple[int, ...], memoryview | None]] = []
        with self._lock:
            known = {s: self._indexes[s] for s in by_shard if s in self._indexes}
        first = [s for s in by_shard if s not in known]
        whole = {s for s in first if len(by_shard[s]) == self._count}
        # Every chunk of a shard is needed: the whole object, index included, in one request.
        replies = self._get_many(
            [(self._key(s), None, None if s in whole else self._index_bytes) for s in first]
        )
        for shard, reply in zip(first, replies, strict=True):
            index = None if reply is None else self._parse_index(reply[-self._index_bytes :])
            with self._lock:
                self._indexes[shard] = index
            known[shard] = index
            if shard in whole:
                wanted = by_shard.pop(shard)
                if index is None or reply is None:
                    out.extend((g, None) for g in wanted)
                else:
                    out.extend((g, _slice(reply, index[self._local(g)])) for g in wanted)
        requests: list[_Request] = []
        members: list[list[tuple[tuple[int, ...], int, int]]] = []
        for shard, wanted in by_shard.items():
            index = known[shard]
            spans: list[tuple[int, int, tuple[int, ...]]] = []
            for g in wanted:
                offset, nbytes = (0, 0) if index is None else map(int, index[self._local(g)])
                if index is None or offset == _EMPTY:
                    out.append((g, None))
                else:
                    spans.append((offset, offset + nbytes, g))
            spans.sort()
            key, last = self._key(shard), -1
            for a, b, g in spans:
                if (
                    self.coalesce
                    and members
                    and last == len(requests) - 1
                    and (a - (requests[-1][2] or 0) <= _MAX_GAP)
                ):
                    start = requests[-1][1]
                    requests[-1] = (key, start, max(requests[-1][2] or 0, b))
                    members[-1].append((g, a, b))
                else:
                    requests.append((key, a, b))
                    members.append([(g, a, b)])
                last = len(requests) - 1
        for (key, start, _), group, payload in zip(
            requests, members, self._get_many(requests), strict=True
        ):
            if payload is None:
                raise OSError(f"shard {key} vanished while being read")
            base = start or 0
            out.extend((g, payload[a - base : b - base]) for g, a, b in group)
        return out

    def _local(self, coords: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(c % p for c, p in zip(coords, self.per_shard, strict=True))

    # -- reading ---------------------------------------------------------------------------

    def read(
        self,
        region: Sequence[slice | int],
        out: np.ndarray | None = None,
        *,
        emit: Emit = copy_emit,
    ) -> np.ndarray:
        """Read ``array[region]`` into ``out`` (allocated in the stored dtype when None).

        Parameters
        ----------
        region
            One entry per axis: a slice with step 1 (bounds within the array) or an
            integer index, which drops that axis from the result.
        out
            Output array of the selection's shape; any dtype ``emit`` can write.
        emit
            Writes each decoded chunk region into its view of ``out`` (called from the
            decoding threads, on disjoint views).
        """
        starts, stops, keep = [], [], []
        for axis, (item, dim) in enumerate(zip(region, self.shape, strict=True)):
            if isinstance(item, slice):
                lo, hi, step = item.indices(dim)
                if step != 1 or hi < lo:
                    raise ValueError(f"unsupported slice {item} on axis {axis}")
                starts.append(lo)
                stops.append(hi)
                keep.append(True)
            else:
                index = int(item) + (dim if int(item) < 0 else 0)
                if not 0 <= index < dim:
                    raise IndexError(f"index {item} out of range for axis {axis}")
                starts.append(index)
                stops.append(index + 1)
                keep.append(False)
        full_shape = tuple(b - a for a, b in zip(starts, stops, strict=True))
        result_shape = tuple(n for n, k in zip(full_shape, keep, strict=True) if k)
        if out is None:
            out = np.empty(result_shape, self.dtype)
        if tuple(out.shape) != result_shape:
            raise ValueError(f"out has shape {out.shape}, the region {result_shape}")
        # Dropped axes come back as length-1 axes of a view (never a copy, even when
        # ``out`` is itself a strided view such as the inside of a padded patch).
        target = out[tuple(slice(None) if k else np.newaxis for k in keep)]
        if target.size == 0:
            return out
        grid = [
            range(a // c, (b - 1) // c + 1)
            for a, b, c in zip(starts, stops, self.chunks, strict=True)
        ]
        by_shard: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for coords in itertools.product(*grid):
            shard = tuple(c // p for c, p in zip(coords, self.per_shard, strict=True))
            by_shard.setdefault(shard, []).append(coords)
        payloads = self._fetch(by_shard)

        def place(coords: tuple[int, ...], payload: memoryview | None) -> None:
            src, dst = [], []
            for c, edge, a, b in zip(coords, self.chunks, starts, stops, strict=True):
                lo, hi = max(c * edge, a), min((c + 1) * edge, b)
                src.append(slice(lo - c * edge, hi - c * edge))
                dst.append(slice(lo - a, hi - a))
            view = target[tuple(dst)]
            if payload is None:
                emit(np.full(view.shape, self.fill_value, self.dtype), view)
                return
            chunk = getattr(self._scratch, "chunk", None)
            if chunk is None:
                chunk = self._scratch.chunk = np.empty(self.chunks, self.dtype)
            assert self._decode is not None
            self._decode(payload, chunk)
            emit(chunk[tuple(src)], view)

        futures = [self._pool.submit(place, coords, data) for coords, data in payloads]
        for future in futures:
            future.result()
        return out


def _local_root(store: Any) -> str | None:
    """The directory of a local store reached only through retry wrappers, else None.

    Local files are then read with ``os.pread`` in the calling thread, skipping the event
    loop round trip (retrying a local read has nothing to ride out). Any other wrapper
    (byte counting, the chunk cache) keeps every read going through the store.
    """
    from zarr.storage import LocalStore

    from voxlake.volumes.retry import RetryingStore

    while isinstance(store, RetryingStore):
        store = store._store
    return str(store.root) if type(store) is LocalStore else None


def _pread(path: str, start: int | None, stop: int | None) -> memoryview | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if start is None:
            size = os.fstat(fd).st_size
            length = size if stop is None else min(stop, size)
            start = size - length
        else:
            length = (stop or 0) - start
        data = os.pread(fd, length, start)
    finally:
        os.close(fd)
    if len(data) != length:
        raise OSError(f"short read of {path}: {len(data)} of {length} bytes")
    return memoryview(data)


def _slice(view: memoryview, entry: np.ndarray) -> memoryview | None:
    offset, nbytes = int(entry[0]), int(entry[1])
    return None if offset == _EMPTY else view[offset : offset + nbytes]


def _encoder(codec: Any) -> Callable[[np.ndarray], bytes] | None:
    """``encode(chunk) -> bytes`` exactly as zarr 3 encodes a chunk, or None."""
    name = type(codec).__name__
    if name == "BloscCodec":
        from numcodecs import Blosc

        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[_setting(codec.shuffle)]
        blosc = Blosc(
            cname=_setting(codec.cname),
            clevel=int(codec.clevel),
            shuffle=shuffle,
            blocksize=int(codec.blocksize),
            typesize=int(codec.typesize),
        )
        return lambda chunk: bytes(blosc.encode(chunk))
    if name == "ZstdCodec":
        from numcodecs import Zstd

        zstd = Zstd(level=int(codec.level), checksum=bool(codec.checksum))
        return lambda chunk: bytes(zstd.encode(chunk))
    return None


def _morton_order(per_shard: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The chunks of a shard in the order zarr writes them (Morton order)."""
    try:  # zarr 3.1
        from zarr.core.indexing import morton_order_iter
    except ImportError:  # zarr 3.2 and later
        from zarr.core.indexing import morton_order_coords  # type: ignore[attr-defined]

        return list(morton_order_coords(tuple(per_shard)))
    return list(morton_order_iter(per_shard))


class ShardWriter(_ShardedArray):
    """Write a sharded array chunk layer by chunk layer, bit for bit as zarr 3.1 would.

    zarr encodes a shard through an asyncio pipeline of per-chunk codec objects, which
    costs about as much CPU as the compression itself. This writer encodes chunks with
    numcodecs directly, in zarr's layout: a shard's chunks in Morton order of its chunk
    grid, chunks equal to the fill value left out, then the index (little-endian offsets
    and lengths) and its CRC32C. The Morton order interleaves the chunk layers, so a
    shard cannot be written before its last layer is in. Zarr itself would want the
    shard's voxels at once, plus every encoded chunk and their concatenation: three
    copies at the peak. Here each chunk layer is encoded as soon as it is complete and
    dropped; only the encoded chunks wait, and a local shard is written piece by piece.
    The tests compare the stored objects byte for byte with zarr's. Only arrays
    :meth:`ShardedReader.supports` (the layout the store writes) are handled; the volume
    writer leaves others to zarr.

    Slices must arrive in order; a chunk layer cut across two slabs is gathered first.
    """

    def __init__(self, array: Any) -> None:
        if not ShardedReader.supports(array):
            raise ValueError("array layout not handled by the lean writer; write it with zarr")
        super().__init__(array)
        encode = _encoder(self._codec)
        if encode is None:
            raise ValueError("chunk codec not handled by the lean writer")
        self._encode = encode
        self._order = _morton_order(self.per_shard)
        self._pending: dict[tuple[int, ...], bytes] = {}  # chunk coordinates -> payload
        self._gathered: np.ndarray | None = None  # a chunk layer cut across slabs

    def add(self, z0: int, data: np.ndarray) -> None:
        """Take slices ``z0`` to ``z0 + depth`` of the array (the next ones in order)."""
        layer, depth, done = self.chunks[-3], data.shape[-3], 0
        while done < depth:
            z = z0 + done
            first = z - z % layer
            stop = min(first + layer, self.shape[-3])
            take = min(stop - z, depth - done)
            piece = data[..., done : done + take, :, :]
            done += take
            if self._gathered is None and z == first and take == stop - first:
                self._encode_layer(first, piece)  # a whole chunk layer: no copy
                continue
            if self._gathered is None:
                shape = (*self.shape[:-3], stop - first, *self.shape[-2:])
                self._gathered = np.empty(shape, self.dtype)
            self._gathered[..., z - first : z - first + take, :, :] = piece
            if z + take == stop:
                whole, self._gathered = self._gathered, None
                self._encode_layer(first, whole)

    def _encode_layer(self, first: int, block: np.ndarray) -> None:
        """Encode the chunks of one chunk layer (slices ``first`` on); flush finished shards."""
        counts = [-(-n // c) for n, c in zip(block.shape, self.chunks, strict=True)]
        counts[-3] = 1
        z_chunk = first // self.chunks[-3]
        chunk = np.empty(self.chunks, self.dtype)
        for coords in itertools.product(*(range(n) for n in counts)):
            region = tuple(
                slice(i * n, (i + 1) * n) for i, n in zip(coords, self.chunks, strict=True)
            )
            part = block[region]
            if part.shape == self.chunks:
                source = np.ascontiguousarray(part)
            else:  # at the array's edge zarr pads the chunk with the fill value
                chunk.fill(self.fill_value)
                chunk[tuple(slice(0, n) for n in part.shape)] = part
                source = chunk
            all_fill = (source == self.fill_value).all() if self.fill_value else not source.any()
            if all_fill:
                continue  # zarr does not write chunks equal to the fill value
            self._pending[(*coords[:-3], z_chunk, *coords[-2:])] = self._encode(source)
        stop = first + block.shape[-3]
        if stop % self.shards[-3] == 0 or stop == self.shape[-3]:
            self._flush(first // self.shards[-3])

    def _flush(self, z_shard: int) -> None:
        counts = [-(-n // s) for n, s in zip(self.shape, self.shards, strict=True)]
        counts[-3] = 1
        for coords in itertools.product(*(range(n) for n in counts)):
            shard = (*coords[:-3], z_shard, *coords[-2:])
            index = np.full((*self.per_shard, 2), _EMPTY, dtype="<u8")
            parts: list[bytes] = []
            offset = 0
            for local in self._order:
                at = zip(shard, self.per_shard, local, strict=True)
                payload = self._pending.pop(tuple(s * n + i for s, n, i in at), None)
                if payload is None:
                    continue
                parts.append(payload)
                index[local] = (offset, len(payload))
                offset += len(payload)
            if parts:
                import google_crc32c

                body = index.tobytes()
                parts += [body, google_crc32c.value(body).to_bytes(4, "little")]
            self._put(self._key(shard), parts)

    def _put(self, key: str, parts: list[bytes]) -> None:
        """Store one shard object (no parts: every chunk is fill, so there is none)."""
        if self._root is not None:
            path = os.path.join(self._root, key)
            if not parts:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                return
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                for part in parts:  # no joined copy of the shard
                    handle.write(part)
            return
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        if parts:
            buffer = default_buffer_prototype().buffer.from_bytes(b"".join(parts))
            sync(self._store.set(key, buffer))
        else:
            sync(self._store.delete(key))
