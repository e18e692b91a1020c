"""Read archive members (``zip://M::A``, ``tar://M::A``) through one open archive per process.

fsspec opens the archive afresh for every member URL it is given: a zip's central
directory is parsed again (5 ms a member in a 480-member zip, growing with the member
count), and a tar is indexed again from its first header, which for a ``.tar.gz`` means
decompressing everything before the member, for every member. Here each process keeps
the few archives it reads open (:data:`OPEN_ARCHIVES`, closed after :data:`IDLE_SECONDS`
unused, when a local archive's size or mtime changes, or when a remote one's size, ETag or
modification time does, asked every :data:`REVALIDATE_SECONDS`), with their member index:

- zip: Python's ``zipfile`` over the archive, its central directory read once; a zip cut
  short has none (it is at the end): its members are found from their local headers, in
  order, as far as they are whole (:func:`scan_cut_zip`);
- tar: the members are indexed as far as the reads have gone (``tarfile``'s own walk,
  resumed where it stopped); a plain tar is read at each member's offset;
- tar.gz: decompressed through :class:`SeekableGzip`, which remembers the decompressor's
  state every :data:`CHECKPOINT_SPACING` bytes of output, so a member behind the current
  position costs at most that much decompression, not a pass from the start;
- tar.bz2 and tar.xz: ``bz2`` and ``lzma`` streams, forward only (a member behind the
  current position restarts the stream): prefer zip, tar or tar.gz for large archives.

Member bytes are read with the same cap as files (``file_too_large``); an archive that
cannot be read is ``corrupt_archive``.
"""

from __future__ import annotations

import bisect
import bz2
import collections
import io
import json
import lzma
import os
import re
import struct
import tarfile
import threading
import time
import zipfile
import zlib
from typing import TYPE_CHECKING, Any, Final

from voxlake.errors import SourceError
from voxlake.ingest.file_reads import _read_error, open_binary, read_whole


def _inflate_module() -> Any:
    """zlib-ng's zlib module where it is installed (the `fast` extra: inflate about 1.5x
    zlib's), else zlib."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:  # CI's second run (make test-latest) goes without the extra
        return zlib
    return zlib_ng


_inflate_lib: Final[Any] = _inflate_module()

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "CACHE_BYTES",
    "CHECKPOINT_SPACING",
    "IDLE_SECONDS",
    "MAX_CHECKPOINTS",
    "OPEN_ARCHIVES",
    "REVALIDATE_SECONDS",
    "SeekableGzip",
    "archive_of",
    "is_archive_member",
    "read_member",
    "scan_cut_zip",
    "walk_cut_zip",
    "walk_tar",
]

#: Archives each process keeps open at most (the least recently read is closed first).
OPEN_ARCHIVES: Final = 4
#: Seconds an archive stays open without a read.
IDLE_SECONDS: Final = 60.0
#: Seconds between two checks that a remote archive kept open is still the object that was
#: opened (its size, ETag and modification time: one metadata request). A local archive
#: is checked at every read (one ``stat``).
REVALIDATE_SECONDS: Final = 5.0
#: Uncompressed bytes between two remembered states of a gzip stream (each holds about
#: 45 KiB: zlib's state and its 32 KiB window), at first: see :class:`SeekableGzip`.
CHECKPOINT_SPACING: Final = 4 << 20
#: Remembered states of one gzip stream at most (about 23 MiB).
MAX_CHECKPOINTS: Final = 512
#: Decompressed bytes of one gzip stream kept for reads behind the decompressor (the
#: files of a 64 MiB series read out of archive order come from there).
CACHE_BYTES: Final = 64 << 20

_PROTOCOLS: Final = ("zip", "tar")
_IN_CHUNK: Final = 256 << 10
_OUT_CHUNK: Final = 1 << 20


def is_archive_member(url: str) -> bool:
    """Whether `url` names a member of a zip or tar archive (``zip://M::A``)."""
    return "::" in url and url.split("://", 1)[0] in _PROTOCOLS


def archive_of(url: str) -> str | None:
    """The URL of the archive holding the member `url`; None when `url` is no member."""
    return url.rpartition("::")[2] if is_archive_member(url) else None


def read_member(
    url: str, *, max_bytes: int, storage_options: dict[str, Any] | None = None
) -> bytes:
    """The bytes of the archive member `url`, refused past `max_bytes`
    (``file_too_large``)."""
    protocol, rest = url.split("://", 1)
    member, target = rest.split("::", 1)
    key = _key(protocol, target, storage_options)
    try:
        while True:
            archive = _CACHE.get(key, lambda: _open(protocol, target, storage_options, max_bytes))
            if not _still_the_same(archive, target, storage_options):
                _CACHE.drop(key)  # replaced since it was opened: its index no longer holds
                continue
            with archive.lock:
                if not archive.closed:  # else closed by another thread meanwhile: again
                    return archive.read(member, max_bytes)
    except SourceError:
        raise
    except OSError:
        _CACHE.drop(key)  # the next read opens it again
        raise
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, lzma.LZMAError) as exc:
        # The archive stays open: the members before the damage still read, and the
        # next member after it fails where this one did, not after a pass from the start.
        raise SourceError(
            f"cannot read archive: {type(exc).__name__}", code="corrupt_archive"
        ) from exc


# --------------------------------------------------------------------------- the cache
def _key(protocol: str, target: str, storage_options: dict[str, Any] | None) -> tuple[Any, ...]:
    """What identifies an open archive: its URL and options, and for a local file its
    size and mtime (a file replaced between two reads is opened again)."""
    from voxlake.ingest.sources import local_path_of

    options = json.dumps(storage_options or {}, sort_keys=True, default=str)
    local = local_path_of(target)
    if local is None:
        return (protocol, target, options)
    try:
        stat = os.stat(local)
    except OSError as exc:
        raise _read_error(exc) from exc
    return (protocol, target, options, stat.st_size, stat.st_mtime_ns)


def _remote_identity(info: dict[str, Any] | None) -> tuple[str, ...] | None:
    """What tells one version of a remote object from another, from its fsspec info."""
    if not info:
        return None
    return tuple(str(info.get(field)) for field in ("size", "ETag", "LastModified", "mtime"))


def _still_the_same(archive: _Archive, target: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether the remote archive at `target` is still the object `archive` opened (asked
    at most every :data:`REVALIDATE_SECONDS`; local archives are keyed by their stat)."""
    if archive.identity is None or time.monotonic() - archive.checked < REVALIDATE_SECONDS:
        return True
    from fsspec.core import url_to_fs

    from voxlake.ingest.sources import open_kwargs

    fs, path = url_to_fs(target, **open_kwargs(target, storage_options))
    fs.invalidate_cache(path)  # the listing's info may be cached in this instance
    same = _remote_identity(fs.info(path)) == archive.identity
    archive.checked = time.monotonic()
    return same


class _Cache:
    """The open archives of this process, least recently read first."""

    def __init__(self) -> None:
        self._open: collections.OrderedDict[tuple[Any, ...], tuple[_Archive, float]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...], opener: Callable[[], _Archive]) -> _Archive:
        with self._lock:
            now = time.monotonic()
            stale = [k for k, (_, used) in self._open.items() if now - used > IDLE_SECONDS]
            for k in stale:
                self._close(k)
            found = self._open.pop(key, None)
            archive = found[0] if found is not None else opener()
            self._open[key] = (archive, now)
            while len(self._open) > OPEN_ARCHIVES:
                self._close(next(iter(self._open)))
            return archive

    def drop(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            if key in self._open:
                self._close(key)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._open):
                self._close(key)

    def _close(self, key: tuple[Any, ...]) -> None:
        archive, _ = self._open.pop(key)
        with archive.lock:  # not while another thread reads it
            archive.close()


_CACHE: Final = _Cache()


# --------------------------------------------------------------------------- archives
class _Archive:
    """An open archive; `lock` is held while it is read or closed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = False
        self.identity: tuple[str, ...] | None = None  # remote: see _still_the_same
        self.checked = time.monotonic()

    def read(self, member: str, max_bytes: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True


def _normal(name: str) -> str:
    """A member name as the listing wrote it (fsspec's archive file systems: repeated
    slashes collapsed, no trailing slash)."""
    return re.sub("/+", "/", name.rstrip("/"))


def _missing() -> SourceError:
    return SourceError("archive member not found", code="unreadable")


class _Index:
    """The members a walk of the archive finds, indexed as far as the reads have needed
    (a name archived twice is read as its first copy, wherever the walk stands: an
    extractor would take the last, which needs a walk to the end). Where the walk fails
    (damage, a cut), the members found stay readable and every later search raises the
    same error at once, not after another pass."""

    def __init__(self, walk: Iterator[tuple[str, Any]]) -> None:
        self._walk: Iterator[tuple[str, Any]] | None = walk
        self._found: dict[str, Any] = {}
        self._error: Exception | None = None

    def find(self, member: str) -> Any:
        while member not in self._found and self._walk is not None:
            try:
                name, info = next(self._walk)
            except StopIteration:
                self._walk = None
            except Exception as exc:
                self._walk, self._error = None, exc
            else:
                self._found.setdefault(_normal(name), info)
        if member not in self._found and self._error is not None:
            raise self._error.with_traceback(None)  # not a traceback grown by each raise
        return self._found.get(member)


def _headers(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """`tar`'s member headers, read one by one. tarfile also keeps each in a list (a large
    archive's would fill the memory); nothing here reads it, so it is emptied."""
    while (info := tar.next()) is not None:
        tar.members.clear()  # type: ignore[attr-defined]
        yield info


class _Zip(_Archive):
    def __init__(self, raw: Any) -> None:
        super().__init__()
        self._raw = raw
        self._zip = zipfile.ZipFile(raw)
        self._members = {_normal(info.filename): info for info in self._zip.infolist()}

    def read(self, member: str, max_bytes: int) -> bytes:
        info = self._members.get(member)
        if info is None or info.is_dir():
            raise _missing()
        with self._zip.open(info) as handle:
            return read_whole(handle, max_bytes, size=info.file_size)

    def close(self) -> None:
        super().close()
        self._zip.close()
        self._raw.close()


class _CutZip(_Archive):
    """A zip without its central directory (cut short): members found from their local
    headers, in order, as far as the scan gets (:func:`scan_cut_zip`)."""

    def __init__(self, raw: Any, limit: int) -> None:
        super().__init__()
        self._raw = raw
        scan = scan_cut_zip(raw, limit=limit, verify=False)
        self._index = _Index((info.filename, info) for info in scan)

    def read(self, member: str, max_bytes: int) -> bytes:
        info = self._index.find(member)
        if info is None:
            raise _missing()
        self._raw.seek(info.header_offset)  # here: the member's data (see scan_cut_zip)
        with zipfile.ZipExtFile(self._raw, "r", info) as handle:  # checks the CRC at the end
            return read_whole(handle, max_bytes, size=info.file_size)

    def close(self) -> None:
        super().close()
        self._raw.close()


_LOCAL_HEADER: Final = struct.Struct("<4s5H3I2H")  # PK\3\4, version ... name and extra lengths
_ENDS: Final = (b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06")  # central directory records


def scan_cut_zip(raw: Any, *, limit: int, verify: bool) -> Iterator[zipfile.ZipInfo]:
    """The members of a zip read from its local headers, in order, for a zip whose central
    directory is missing (a download cut short). Each ``ZipInfo``'s ``header_offset`` is
    where the member's data starts. `verify`: each member is decompressed and its CRC-32
    checked before it is yielded.

    Raises ``zipfile.BadZipFile`` where the scan stops: a header or data cut short, a CRC
    that does not match, an encrypted member, a method other than stored or deflated, a
    member of unknown size that is stored or inflates past `limit`, or the start of the
    central directory (the members before it are whole, but the archive is damaged).
    """
    offset = 0
    while True:
        raw.seek(offset)
        head = raw.read(_LOCAL_HEADER.size)
        if head[:4] in _ENDS:
            raise zipfile.BadZipFile("the zip's central directory is cut or damaged")
        if len(head) < _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile("the zip is cut or damaged: no member header here")
        _, _, flags, method, _, _, crc, csize, size, name_len, extra_len = _LOCAL_HEADER.unpack(
            head
        )
        rest = raw.read(name_len + extra_len)
        if len(rest) < name_len + extra_len:
            raise zipfile.BadZipFile("the zip is cut in a member header")
        if flags & 0x1 or method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise zipfile.BadZipFile("an encrypted member, or one of another method")
        info = zipfile.ZipInfo(rest[:name_len].decode("utf-8" if flags & 0x800 else "cp437"))
        info.compress_type = method
        info.header_offset = data = offset + _LOCAL_HEADER.size + name_len + extra_len
        if flags & 0x8:  # sizes and CRC follow the data, in a descriptor
            if method != zipfile.ZIP_DEFLATED:
                raise zipfile.BadZipFile("a stored member of unknown size")
            csize, size, crc = _inflate_to_end(raw, data, limit)
            end = _after_descriptor(raw, data + csize, crc, csize, size)
        else:
            csize, size = _zip64_sizes(rest[name_len:], csize, size)
            end = data + csize
        info.compress_size, info.file_size, info.CRC = csize, size, crc
        if verify and size <= limit:  # beyond the cap, the listing refuses the member
            raw.seek(data)
            try:
                with zipfile.ZipExtFile(raw, "r", info) as handle:
                    while handle.read(_OUT_CHUNK):  # BadZipFile on a bad CRC
                        pass
            except (EOFError, zlib.error) as exc:
                raise zipfile.BadZipFile("the zip is cut or damaged in a member's data") from exc
        elif verify:
            raw.seek(end - 1)
            if not raw.read(1):
                raise zipfile.BadZipFile("the zip is cut in a member's data")
        yield info
        offset = end


def _zip64_sizes(extra: bytes, csize: int, size: int) -> tuple[int, int]:
    """The compressed and uncompressed sizes, from the zip64 extra field where the local
    header says 0xFFFFFFFF."""
    if 0xFFFFFFFF not in (csize, size):
        return csize, size
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, at)
        if tag == 1:
            values = iter(struct.unpack_from(f"<{length // 8}Q", extra, at + 4))
            size = next(values) if size == 0xFFFFFFFF else size
            csize = next(values) if csize == 0xFFFFFFFF else csize
            return csize, size
        at += 4 + length
    raise zipfile.BadZipFile("a zip64 member without its sizes")


def _inflate_to_end(raw: Any, data: int, limit: int) -> tuple[int, int, int]:
    """(compressed size, size, CRC-32) of the deflated member starting at `data`."""
    raw.seek(data)
    inflate = zlib.decompressobj(-15)
    fed = size = crc = 0
    while not inflate.eof:
        chunk = raw.read(_IN_CHUNK)
        if not chunk:
            raise zipfile.BadZipFile("the zip is cut in a member's data")
        fed += len(chunk)
        while chunk and not inflate.eof:
            out = inflate.decompress(chunk, _OUT_CHUNK)
            size, crc = size + len(out), zlib.crc32(out, crc)
            if size > limit:
                raise zipfile.BadZipFile("a member of unknown size beyond the size cap")
            chunk = inflate.unconsumed_tail
    return fed - len(inflate.unused_data), size, crc


def _after_descriptor(raw: Any, at: int, crc: int, csize: int, size: int) -> int:
    """Where the data descriptor at `at` (signature optional, 4- or 8-byte sizes) ends."""
    raw.seek(at)
    found = raw.read(24)
    if found[:4] == b"PK\x07\x08":
        found, at = found[4:], at + 4
    for width, form in ((4, "<3I"), (8, "<IQQ")):
        if len(found) >= 4 + 2 * width and struct.unpack_from(form, found) == (crc, csize, size):
            return at + 4 + 2 * width
    raise zipfile.BadZipFile("a data descriptor cut short or not matching its member")


class _Tar(_Archive):
    def __init__(self, raw: Any, stream: Any) -> None:
        super().__init__()
        self._raw = raw
        self._stream = stream
        self._tar = tarfile.open(fileobj=stream, mode="r:")  # noqa: SIM115 (kept open)
        self._index = _Index((info.name, info) for info in _headers(self._tar))

    def read(self, member: str, max_bytes: int) -> bytes:
        info = self._index.find(member)
        if info is None or not info.isfile():  # links were refused when listing
            raise _missing()
        handle = self._tar.extractfile(info)
        assert handle is not None  # a regular file
        return read_whole(handle, max_bytes, size=info.size)

    def close(self) -> None:
        super().close()
        self._tar.close()
        self._stream.close()
        self._raw.close()


def _tar_stream(raw: Any, *, forward_only: bool = False) -> Any:
    """The tar bytes of `raw`: itself, or decompressed by what its magic bytes name.
    `forward_only`: a gzip stream keeps no states and only one piece of output."""
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        gzip = (
            SeekableGzip(raw, spacing=1 << 62, cache_bytes=0) if forward_only else SeekableGzip(raw)
        )
        return io.BufferedReader(gzip, buffer_size=64 << 10)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


def walk_tar(
    target: str, storage_options: dict[str, Any] | None = None
) -> Iterator[tarfile.TarInfo]:
    """The member headers of the tar archive at `target` (plain or compressed), in archive
    order, read as they come: a compressed tar is decompressed once, forward.

    The members before damage are yielded before the error (``tarfile.TarError``,
    ``EOFError`` for a cut stream, ``zlib.error``...) is raised. ``tarfile`` itself takes
    a header cut short or garbled for the end of the archive; here the archive must end
    with its end-of-archive block, and a compressed stream with its own end (gzip's
    checksum), or the walk raises ``tarfile.ReadError``.
    """
    with open_binary(target, storage_options) as raw:
        stream = _tar_stream(raw, forward_only=True)
        with tarfile.open(fileobj=stream, mode="r:") as tar:
            yield from _headers(tar)
            end = tar.offset
        stream.seek(end)
        block = stream.read(tarfile.BLOCKSIZE)
        if block != bytes(tarfile.BLOCKSIZE):
            raise tarfile.ReadError(
                "a member header is damaged"
                if len(block) == tarfile.BLOCKSIZE
                else "the archive is cut short (no end-of-archive block)"
            )
        while stream is not raw and stream.read(_OUT_CHUNK):
            pass  # to the compressed stream's end: its checksum is checked there


def walk_cut_zip(
    target: str, storage_options: dict[str, Any] | None = None, *, limit: int
) -> Iterator[zipfile.ZipInfo]:
    """The whole members of the zip at `target` whose central directory is missing, each
    checked against its CRC-32, then ``zipfile.BadZipFile`` where they end
    (:func:`scan_cut_zip`)."""
    with open_binary(target, storage_options) as raw:
        yield from scan_cut_zip(raw, limit=limit, verify=True)


def _open(
    protocol: str, target: str, storage_options: dict[str, Any] | None, limit: int
) -> _Archive:
    """Open the archive at `target` (a path or fsspec URL) and what reads its members
    (`limit`: the size cap, for the members of a cut zip whose size is not declared)."""
    raw = open_binary(target, storage_options)
    try:
        archive: _Archive
        if protocol == "zip":
            try:
                archive = _Zip(raw)
            except zipfile.BadZipFile:  # no central directory: cut short, read as far as whole
                archive = _CutZip(raw, limit)
        else:
            archive = _Tar(raw, _tar_stream(raw))
    except BaseException:
        raw.close()
        raise
    archive.identity = _remote_identity(getattr(raw, "details", None))  # local files: none
    return archive


# --------------------------------------------------------------------------- gzip
class SeekableGzip(io.RawIOBase):
    """A gzip stream (one or more members, zero padding after them allowed) read with
    seeks in both directions.

    Output is made in pieces of up to `piece_bytes`, and the last `cache_bytes` of them
    are kept: the files of one series, read in slice order rather than in archive order,
    are found there. Further back, the decompressor restarts from a copy of its state:
    one is kept every `spacing` bytes of output, and when more than `max_points` have
    been kept, every other one is dropped and the spacing doubles, so the copies of a
    large archive take at most ``max_points`` times 45 KiB. Only the part read so far is
    indexed.
    """

    def __init__(
        self,
        raw: Any,
        *,
        spacing: int = CHECKPOINT_SPACING,
        max_points: int = MAX_CHECKPOINTS,
        cache_bytes: int = CACHE_BYTES,
        piece_bytes: int = _OUT_CHUNK,
    ) -> None:
        self._raw = raw
        self._piece_bytes = piece_bytes
        self._spacing = spacing
        self._max_points = max_points
        self._cache_bytes = cache_bytes
        # (uncompressed offset, compressed offset, decompressor state there or None at the
        # start of the stream)
        self._points: list[tuple[int, int, Any]] = [(0, 0, None)]
        self._pieces: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._starts: list[int] = []  # the keys of self._pieces, sorted
        self._cached = 0
        self._piece_start, self._piece = 0, b""  # the piece being read
        self._pos = 0
        self._restore(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("seek from the end of a gzip stream")
        if offset < 0:
            raise ValueError("negative seek position")
        self._pos = offset
        return offset

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        start, piece = self._piece_start, self._piece
        if not start <= self._pos < start + len(piece):
            found = self._piece_at(self._pos)
            if found is None:
                return 0
            self._piece_start, self._piece = start, piece = found
        at = self._pos - start
        count = min(len(view), len(piece) - at)
        view[:count] = piece[at : at + count]
        self._pos += count
        return count

    # ------------------------------------------------------------------ pieces
    def _piece_at(self, pos: int) -> tuple[int, bytes] | None:
        """The piece of output holding offset `pos` (None past the end)."""
        index = bisect.bisect_right(self._starts, pos) - 1
        if index >= 0:
            start = self._starts[index]
            piece = self._pieces[start]
            if pos < start + len(piece):
                self._pieces.move_to_end(start)
                return start, piece
        point = bisect.bisect_right(self._points, pos, key=lambda p: p[0]) - 1
        if pos < self._made or self._points[point][0] > self._made:
            self._restore(point)  # behind the decompressor, or a copy is nearer
        while True:
            made = self._next_piece()
            if made is None:
                return None
            if pos < made[0] + len(made[1]):
                return made

    def _keep(self, start: int, piece: bytes) -> None:
        if start in self._pieces:
            self._pieces.move_to_end(start)
            return
        self._pieces[start] = piece
        bisect.insort(self._starts, start)
        self._cached += len(piece)
        while self._cached > self._cache_bytes and len(self._pieces) > 1:
            old, dropped = self._pieces.popitem(last=False)
            del self._starts[bisect.bisect_left(self._starts, old)]
            self._cached -= len(dropped)

    # ------------------------------------------------------------------ decompressor
    def _restore(self, index: int) -> None:
        made, offset, state = self._points[index]
        self._raw.seek(offset)
        self._offset = offset  # compressed offset of the first byte of self._pending
        self._pending = b""  # compressed bytes read but not taken by the decompressor
        self._inflate = state.copy() if state is not None else _inflate_lib.decompressobj(31)
        self._made = made  # uncompressed offset of the decompressor's next output
        self._ended = False

    def _next_piece(self) -> tuple[int, bytes] | None:
        """Decompress the next piece (kept in the cache); None at the end of the stream."""
        while not self._ended:
            if self._inflate.eof and not self._next_member():  # a gzip member ended
                self._ended = True
                return None
            if not self._pending:
                self._pending = self._read_raw()
                if not self._pending:
                    raise EOFError("compressed file ended before the end-of-stream marker")
            before = len(self._pending)
            try:
                out = self._inflate.decompress(self._pending, self._piece_bytes)
            except _inflate_lib.error as exc:  # zlib-ng's has its own class
                raise zlib.error(str(exc)) from exc
            if self._inflate.eof:  # what follows the member: the next one, or padding
                self._pending = self._inflate.unused_data
            else:
                self._pending = self._inflate.unconsumed_tail
            self._offset += before - len(self._pending)
            if out:
                start = self._made
                self._made += len(out)
                self._keep(start, out)
                self._remember()
                return start, out
        return None

    def _read_raw(self) -> bytes:
        return bytes(self._raw.read(_IN_CHUNK))

    def _next_member(self) -> bool:
        """After a gzip member: skip zero padding; start the next member if one follows."""
        while True:
            stripped = self._pending.lstrip(b"\0")
            self._offset += len(self._pending) - len(stripped)
            self._pending = stripped
            if self._pending:
                break
            self._pending = self._read_raw()
            if not self._pending:
                return False
        self._inflate = _inflate_lib.decompressobj(31)  # the next decompress raises on non-gzip
        return True

    def _remember(self) -> None:
        """Copy the decompressor's state when `spacing` bytes were made since the last."""
        if self._made < self._points[-1][0] + self._spacing or self._inflate.eof:
            return
        # self._offset: where the compressed bytes the decompressor has not taken begin
        self._points.append((self._made, self._offset, self._inflate.copy()))
        if len(self._points) > self._max_points:
            self._points = self._points[::2]
            self._spacing *= 2
