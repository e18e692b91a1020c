"""Read source files' bytes: whole, capped, and ahead of the parser.

:func:`open_bytes` reads one file (local path, ``file://``, an fsspec URL such as
``s3://`` or ``zip://member::archive``, or a DICOMweb instance) and refuses files over
the run's byte cap; :func:`read_ahead` feeds a header task its files in order while the
next ones are being read: by threads, or for local files by the kernel.
"""

from __future__ import annotations

import collections
import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, TypeVar

from voxlake.errors import SourceError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from voxlake.config import IngestConfig
    from voxlake.ingest.dimse import Associations
    from voxlake.ingest.sources import FileRef

__all__ = [
    "READ_AHEAD_BYTES",
    "READ_AHEAD_FILES",
    "open_binary",
    "open_bytes",
    "read_ahead",
    "read_whole",
]

_READ_CHUNK = 8 * 1024 * 1024


def _read_capped(handle: Any, max_bytes: int, *, size: int | None = None) -> bytes:
    """Read at most ``max_bytes + 1`` bytes in bounded chunks.

    ``read(n)`` preallocates ``n`` bytes, so never ask for the cap at once. With the
    file's `size` known, ask for no more than ``size + 1`` bytes while that much is
    expected: a buffer far larger than the file is mapped afresh for every file, and its
    page faults cost the header pass more than the reading (0.2 ms per 512 KiB slice).
    """
    chunks: list[bytes] = []
    total = 0
    while total <= max_bytes:
        want = min(_READ_CHUNK, max_bytes + 1 - total)
        if size is not None and total <= size:
            want = min(want, size + 1 - total)
        chunk = handle.read(want)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def open_bytes(
    url: str,
    *,
    max_bytes: int,
    storage_options: dict[str, Any] | None = None,
    associations: Associations | None = None,
) -> bytes:
    """Read a whole file (local path, ``file://`` or fsspec URL, or a PACS instance),
    refusing oversize files. ``associations``: where DIMSE instances reuse associations."""
    from voxlake.ingest import archives, dicomweb, dimse
    from voxlake.ingest.sources import local_path_of

    if dicomweb.is_dicomweb(url):
        return dicomweb.fetch_instance(url, max_bytes=max_bytes, storage_options=storage_options)
    if dimse.is_dimse(url):
        return dimse.fetch_instance(
            url, max_bytes=max_bytes, storage_options=storage_options, associations=associations
        )

    try:
        if archives.is_archive_member(url):  # through the archive this process keeps open
            return archives.read_member(url, max_bytes=max_bytes, storage_options=storage_options)
        with open_binary(url, storage_options) as handle:
            if local_path_of(url) is not None:
                return _read_local(handle, max_bytes)
            return read_whole(handle, max_bytes)
    except SourceError:
        raise  # the cap (a SourceError is an OSError too)
    except OSError as exc:
        raise _read_error(exc) from exc
    except Exception as exc:
        from voxlake.volumes.retry import is_transient

        if not is_transient(exc):  # botocore/aiohttp connection errors are not OSErrors
            raise
        raise SourceError(
            f"source unreachable ({type(exc).__name__})", code="source_unreachable"
        ) from exc


def open_binary(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The file at `url` (a local path, ``file://`` or fsspec URL) opened for binary
    reads; the caller closes it."""
    from voxlake.ingest.sources import local_path_of, open_kwargs

    local = local_path_of(url)
    if local is not None:
        return open(local, "rb")
    import fsspec

    return fsspec.open(url, "rb", **open_kwargs(url, storage_options)).open()


def _read_local(handle: Any, max_bytes: int) -> bytes:
    """A local file's bytes from its open handle, refusing oversize files."""
    return read_whole(handle, max_bytes, size=os.fstat(handle.fileno()).st_size)


def read_whole(handle: Any, max_bytes: int, *, size: int | None = None) -> bytes:
    """All of `handle` (`size` bytes expected, when known), refusing more than
    `max_bytes` (``file_too_large``) whatever a header declared."""
    return _within(_read_capped(handle, max_bytes, size=size), max_bytes)


def _within(data: bytes, max_bytes: int) -> bytes:
    if len(data) > max_bytes:
        raise SourceError(f"file larger than the {max_bytes} byte cap", code="file_too_large")
    return data


def _read_error(exc: OSError) -> SourceError:
    if isinstance(exc, PermissionError):
        return SourceError("permission denied", code="permission_denied")
    return SourceError(f"cannot read file: {exc.strerror or type(exc).__name__}")


#: Bytes of files read ahead of the one being parsed, at most (the file being parsed
#: and one file of any size are always allowed).
READ_AHEAD_BYTES: Final = 64 << 20
#: Files read ahead of the one being parsed when ``IngestConfig.read_ahead`` is None, by
#: kind of source: local reads wait on the disk, object store and PACS reads on a round
#: trip each, while the parser keeps the core busy. Archive members (zip://M::A,
#: tar://M::A) share one open archive whose reads seek a shared file object: whatever the
#: depth, one thread reads them, one at a time. Local files are not read in threads: the
#: kernel is asked to read them into the page cache (``POSIX_FADV_WILLNEED``) and each is
#: copied from there in its turn, which costs less CPU than a thread handing 512 KiB to
#: the parser (where the call exists; elsewhere threads read them).
READ_AHEAD_FILES: Final = {"local": 2, "remote": 8, "archive": 1}


def read_ahead(
    refs: list[FileRef], config: IngestConfig
) -> Iterator[tuple[FileRef, Future[bytes]]]:
    """``(ref, future of its bytes)`` in order, the next files being read meanwhile.

    Reads run in threads (file and socket reads release the GIL); a failed read raises
    from its future, in its file's turn. Beyond the file being parsed, at most
    ``config.read_ahead`` (or ``READ_AHEAD_FILES``) files and about ``READ_AHEAD_BYTES``
    (by listed size) are read.
    """
    from voxlake.ingest.dimse import Associations
    from voxlake.ingest.sources import local_path_of

    associations = Associations()  # DIMSE: one per read thread for the task, not per file

    def read(ref: FileRef) -> bytes:
        return open_bytes(
            ref.fetch_url, max_bytes=config.max_file_bytes, storage_options=config.storage_options,
            associations=associations,
        )  # fmt: skip

    urls = [ref.fetch_url for ref in refs]
    if any("::" in url for url in urls):
        kind = "archive"
    elif all(local_path_of(url) is not None for url in urls):
        kind = "local"
    else:
        kind = "remote"
    depth = READ_AHEAD_FILES[kind] if config.read_ahead is None else config.read_ahead
    if kind == "local" and hasattr(os, "posix_fadvise"):
        yield from _advised(refs, config.max_file_bytes, depth)
        return
    threads = 1 if kind == "archive" else max(1, depth)
    with associations, ThreadPoolExecutor(threads, thread_name_prefix="voxlake-read-ahead") as pool:
        yield from _bounded(refs, depth, lambda ref: pool.submit(read, ref))


_T = TypeVar("_T")


def _bounded(
    refs: list[FileRef],
    depth: int,
    start: Callable[[FileRef], _T],
    drop: Callable[[_T], None] | None = None,
) -> Iterator[tuple[FileRef, _T]]:
    """``(ref, start(ref))`` in order, `start` called for at most `depth` files (and about
    ``READ_AHEAD_BYTES`` by listed size) beyond the one handed out; `drop` gets what was
    started for files never handed out (the caller stopped early)."""
    upcoming = iter(refs)
    pending: collections.deque[tuple[FileRef, _T]] = collections.deque()

    def fill(target: int) -> None:
        queued = sum(max(ref.size, 0) for ref, _ in pending)
        while len(pending) < target and queued < READ_AHEAD_BYTES:
            ref = next(upcoming, None)
            if ref is None:
                return
            pending.append((ref, start(ref)))
            queued += max(ref.size, 0)

    try:
        fill(depth + 1)
        while pending:
            ref, started = pending.popleft()
            fill(depth)  # read ahead while the caller parses this one
            yield ref, started
            fill(1)  # with no read-ahead, the next file is started only now
    finally:
        if drop is not None:
            for _, left in pending:
                drop(left)


def _advised(
    refs: list[FileRef], max_bytes: int, depth: int
) -> Iterator[tuple[FileRef, Future[bytes]]]:
    """:func:`read_ahead` for local files: the next `depth` files are opened and the
    kernel asked to read them (``POSIX_FADV_WILLNEED``, asynchronous); each file is read
    in the caller's thread in its turn, from the page cache once the kernel is done."""
    # Each file read ahead holds a descriptor: a deep read-ahead of small files must not
    # run the process out of them (a file that cannot be opened fails).
    for ref, opened in _bounded(refs, min(depth, _OPEN_AHEAD), _advise, drop=_close):
        future: Future[bytes] = Future()
        try:
            if isinstance(opened, OSError):
                raise _read_error(opened) from opened
            with os.fdopen(opened, "rb") as handle:
                future.set_result(_read_local(handle, max_bytes))
        except SourceError as exc:  # first: a SourceError is an OSError too
            future.set_exception(exc)
        except OSError as exc:
            future.set_exception(_read_error(exc))
        yield ref, future


#: Local files opened ahead at most, whatever the read-ahead asked for.
_OPEN_AHEAD: Final = 64


def _advise(ref: FileRef) -> int | OSError:
    """The open file of `ref`, which the kernel was asked to read (or why it cannot be
    opened: raised in its turn)."""
    from voxlake.ingest.sources import local_path_of

    try:
        fd = os.open(str(local_path_of(ref.fetch_url)), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return exc
    with contextlib.suppress(OSError):  # a hint only: the read works without it
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    return fd


def _close(opened: int | OSError) -> None:
    if not isinstance(opened, OSError):
        os.close(opened)
