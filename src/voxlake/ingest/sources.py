"""List the files of a source lazily, in batches: folders, archives, any fsspec URL.

Runs on the driver and touches only metadata (names, sizes, mtimes); contents are read by
the workers. Folders are crawled recursively without following directory symlinks (so a
symlink loop cannot hang the crawl) and without trusting file extensions: what a file is
gets decided by sniffing its bytes on the worker.

Archives (``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz``), given as
sources or found while crawling, are read member by member, never extracted to disk: each
member becomes an fsspec chained URL such as ``zip://dir/IM1.dcm::/data/a.zip`` or
``tar://IM1::s3://bucket/b.tar.gz``. Member paths that are absolute or climb out with
``..`` are refused (``unsafe_member_path``), and members declaring more bytes than the
cap are refused before anything is decompressed (``decompression_cap``); workers also
stop reading at the cap whatever the header claims. Archives inside archives are not
opened. A tar is listed as its headers are read (:func:`voxlake.ingest.archives.walk_tar`),
in archive order: header tasks start on the first members while the rest are listed, a
compressed tar is read forward, and the members before a cut or damage are listed before
the archive's ``corrupt_archive`` problem (the run then refuses their series as
``archive_damaged``). Workers read members through the archives they keep open
(:mod:`voxlake.ingest.archives`).
"""

from __future__ import annotations

import os
import re
import stat
import urllib.parse
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from voxlake.errors import SourceError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = [
    "UID_PATTERN",
    "FileRef",
    "ListingProblem",
    "archive_protocol",
    "is_under",
    "iter_file_batches",
    "list_source",
    "local_path_of",
    "open_kwargs",
    "recorded_source",
    "source_root",
]

#: A UID as PS3.5 9.1 writes it. PACS sources build their in-memory addresses from the
#: server's answers, so anything else ("../", "?", "/") could point a request elsewhere.
UID_PATTERN: Final = re.compile(r"^[0-9]+(\.[0-9]+)*$")

_SKIP_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
_ARCHIVES = (
    (".tar.gz", "tar"),
    (".tgz", "tar"),
    (".tar.bz2", "tar"),
    (".tar.xz", "tar"),
    (".tar", "tar"),
    (".zip", "zip"),
)
_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class FileRef:
    """A file to ingest: its catalog URL (or local path), size in bytes and mtime.

    ``locator`` is where to fetch the bytes when that differs from ``url`` and must not
    be stored (DICOMweb: the WADO-RS URL holds original UIDs); it lives only in memory.
    """

    url: str
    size: int
    mtime: float
    locator: str | None = None

    @property
    def fetch_url(self) -> str:
        """The address to read the bytes from."""
        return self.locator or self.url


@dataclass(frozen=True)
class ListingProblem:
    """A path the crawl could not use (unreadable entry, broken link, bad name)."""

    url: str
    code: str
    message: str


def _local_url(path: str) -> str:
    """A path as a catalog URL: itself when it is valid UTF-8, else a percent-encoded
    ``file://`` URL (arrow strings must be UTF-8; the bytes are kept exactly)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "file://" + urllib.parse.quote(os.fsencode(path), safe="/")


def recorded_source(url: str) -> str:
    """``url`` as the catalog's ``runs`` table keeps it: without a password, and for a PACS
    query (``dicomweb+...``, ``dimse://``) with every filter value replaced by ``*`` (a
    filter can name a patient: ``PatientID=...``, ``PatientName=...``)."""
    if "::" in url:  # a chained archive member URL: the member, then the archive's URL
        member, _, archive = url.rpartition("::")
        return f"{member}::{recorded_source(archive)}"
    if "://" not in url:
        return url
    from voxlake.ingest import dicomweb, dimse

    parts = urllib.parse.urlsplit(url)
    pacs_query = (dicomweb.is_dicomweb(url) or dimse.is_dimse(url)) and bool(parts.query)
    if parts.password is None and not pacs_query:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(":" + parts.password + "@", "@", 1)
    query = parts.query
    if pacs_query:
        keys = [key for key, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)]
        query = "&".join(f"{key}=*" for key in keys)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def local_path_of(url: str) -> str | None:
    """Return the local filesystem path of ``url`` or None if it is remote."""
    if url.startswith("file://"):
        raw = urllib.parse.unquote_to_bytes(url[len("file://") :])
        return os.fsdecode(raw)
    if "://" in url:
        return None
    return url


def source_root(url: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The location every URL :func:`list_source` yields for ``url`` is at or under (see
    :func:`is_under`); None for a PACS query, whose listing is no place, and for part of
    an archive (a chained URL), whose other members are no business of this source."""
    from voxlake.ingest import dicomweb, dimse

    if dicomweb.is_dicomweb(url) or dimse.is_dimse(url) or "::" in url:
        return None  # a PACS query, or part of an archive: not a place to prune
    local = local_path_of(url)
    if local is not None:
        return _local_url(os.path.abspath(local)).rstrip("/") or "/"
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{protocol}://{path.rstrip('/')}"


def is_under(url: str, root: str) -> bool:
    """Whether the file ``url`` (an archive member: its archive) is ``root`` or lies
    under it."""
    location = url.rpartition("::")[2]
    return location == root or location.startswith(root if root.endswith("/") else root + "/")


def _walk_local(root: str) -> Iterator[FileRef | ListingProblem]:
    try:
        top = os.stat(root)
    except OSError as exc:
        raise SourceError(f"source not found: {root}", code="source_not_found") from exc
    if stat.S_ISREG(top.st_mode):
        yield FileRef(_local_url(os.path.abspath(root)), top.st_size, top.st_mtime)
        return
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append, followlinks=False):
        dirnames.sort()
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in dirnames:  # os.walk lists folder symlinks but does not enter them
            link = os.path.abspath(os.path.join(dirpath, name))
            if os.path.islink(link):
                yield ListingProblem(
                    _local_url(link),
                    "symlink_not_followed",
                    "folder symlinks are not followed (give the target as a source)",
                )
        for name in sorted(filenames):
            if name in _SKIP_NAMES or name.startswith("._"):
                continue
            path = os.path.abspath(os.path.join(dirpath, name))
            try:
                info = os.stat(path)  # follows file symlinks; a dangling link fails here
            except OSError as exc:
                yield ListingProblem(
                    _local_url(path), "unreadable", f"cannot stat file: {exc.strerror}"
                )
                continue
            if not stat.S_ISREG(info.st_mode):  # reading a pipe or a device could block
                yield ListingProblem(
                    _local_url(path),
                    "not_regular_file",
                    "not a regular file (pipe, socket, device)",
                )
                continue
            yield FileRef(_local_url(path), info.st_size, info.st_mtime)
    for error in errors:
        where = _local_url(os.path.abspath(error.filename)) if error.filename else root
        yield ListingProblem(where, "unreadable", f"cannot list folder: {error.strerror}")


def _walk_fsspec(
    url: str, storage_options: dict[str, Any] | None
) -> Iterator[FileRef | ListingProblem]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    try:
        entries = fs.find(path, detail=True)
    except FileNotFoundError as exc:
        raise SourceError(f"source not found: {url}", code="source_not_found") from exc
    except Exception as exc:
        raise SourceError(f"cannot list {url}: {exc}", code="source_unreachable") from exc
    if not entries and fs.isfile(path):
        entries = {path: fs.info(path)}
    for name in sorted(entries):
        info = entries[name]
        if info.get("type") not in ("file", None):
            continue
        base = name.rsplit("/", 1)[-1]
        if base in _SKIP_NAMES or base.startswith("._"):
            continue
        mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or 0
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        if "::" in name:  # fsspec would open the rest of the name as another URL
            yield ListingProblem(
                f"{protocol}://{name}", "unsafe_url", "object name holds '::' (a URL chain)"
            )
            continue
        yield FileRef(f"{protocol}://{name}", int(info.get("size") or 0), float(mtime))


def archive_protocol(name: str) -> str | None:
    """``"zip"`` or ``"tar"`` when ``name`` looks like an archive (by extension), else None."""
    lower = name.lower()
    for suffix, protocol in _ARCHIVES:
        if lower.endswith(suffix):
            return protocol
    return None


def _safe_member(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return not (
        name.startswith(("/", "\\"))
        or "\x00" in name
        or ".." in parts
        or (len(parts[0]) == 2 and parts[0][1] == ":")  # C:/...
        or "::" in name  # fsspec would read the rest as another URL to open (any file)
        or "://" in name
    )


def _member(
    ref: FileRef, protocol: str, name: str, *, size: int, link: bool, max_member_bytes: int
) -> FileRef | ListingProblem:
    """The member `name` of the archive `ref` as a file to read, or why it is refused."""
    from voxlake.ingest.archives import _normal

    chained = f"{protocol}://{_normal(name)}::{ref.url}"
    if not _safe_member(name) or link:
        return ListingProblem(
            chained,
            "unsafe_member_path",
            "archive member is a link, or its path is absolute or escapes the archive",
        )
    if size > max_member_bytes:
        return ListingProblem(
            chained, "decompression_cap", f"member declares more than {max_member_bytes} bytes"
        )
    return FileRef(chained, size, ref.mtime)


def _archive_problem(ref: FileRef, exc: Exception, *, listed: int) -> ListingProblem:
    """Why the archive `ref` could not be listed (past `listed` members)."""
    from voxlake.ingest.file_reads import _read_error

    if isinstance(exc, (PermissionError, FileNotFoundError)) and not listed:
        error = _read_error(exc)  # not the archive's fault: permission_denied, unreadable
        return ListingProblem(ref.url, error.code, str(error))
    after = f" after {listed} members (it is cut or damaged there)" if listed else ""
    return ListingProblem(
        ref.url, "corrupt_archive", f"cannot read archive{after}: {type(exc).__name__}"
    )


def _list_walked(
    ref: FileRef,
    protocol: str,
    walk: Iterator[tuple[str, int, bool]],
    *,
    max_member_bytes: int,
) -> Iterator[FileRef | ListingProblem]:
    """The members a walk of the archive `ref` finds (``(name, declared size, is a link)``
    of each one that holds or points at a file), as they come; where the walk fails, the
    archive as a problem (``corrupt_archive``: cut or damaged there)."""
    from voxlake.ingest.archives import _normal

    seen: set[str] = set()
    try:
        for name, size, link in walk:
            if _normal(name) in seen:
                continue  # a name archived twice: its first copy is read (archives._Index)
            seen.add(_normal(name))
            yield _member(
                ref, protocol, name, size=size, link=link, max_member_bytes=max_member_bytes
            )
    except Exception as exc:
        yield _archive_problem(ref, exc, listed=len(seen))


def _list_tar(
    ref: FileRef, *, storage_options: dict[str, Any] | None, max_member_bytes: int
) -> Iterator[FileRef | ListingProblem]:
    """A tar's members as its headers are read (a compressed tar is decompressed once,
    forward, while the workers already read the members listed): the members before
    damage or a cut are listed, then the archive is ``corrupt_archive``."""
    from voxlake.ingest.archives import walk_tar

    walk = (
        (info.name, info.size, not info.isreg())
        for info in walk_tar(ref.url, storage_options)
        if info.isreg() or info.issym() or info.islnk()  # not folders, devices, pipes
    )
    yield from _list_walked(ref, "tar", walk, max_member_bytes=max_member_bytes)


def _list_cut_zip(
    ref: FileRef, *, storage_options: dict[str, Any] | None, max_member_bytes: int
) -> Iterator[FileRef | ListingProblem]:
    """The whole members of a zip without its central directory, from their local headers
    (each checked against its CRC-32), then the archive as ``corrupt_archive`` (the scan
    always ends where the zip is cut or damaged)."""
    from voxlake.ingest.archives import walk_cut_zip

    walk = (
        (info.filename, info.file_size, False)
        for info in walk_cut_zip(ref.url, storage_options, limit=max_member_bytes)
        if not info.is_dir()
    )
    yield from _list_walked(ref, "zip", walk, max_member_bytes=max_member_bytes)


def _list_zip(
    ref: FileRef, *, storage_options: dict[str, Any] | None, max_member_bytes: int
) -> Iterator[FileRef | ListingProblem]:
    """A zip's members, from its central directory (a zip cut short has none: its whole
    members are found from their local headers, :func:`_list_cut_zip`)."""
    import fsspec

    target = ref.url if "://" in ref.url else "file://" + os.path.abspath(ref.url)
    target_protocol = target.split("://", 1)[0]
    try:
        fs = fsspec.filesystem(
            "zip",
            fo=target,
            target_options=storage_options if target_protocol != "file" else None,
            skip_instance_cache=True,
        )
        members = fs.find("", detail=True)
    except zipfile.BadZipFile:  # no central directory: a zip cut short, read as far as whole
        yield from _list_cut_zip(
            ref, storage_options=storage_options, max_member_bytes=max_member_bytes
        )
        return
    except Exception as exc:
        yield _archive_problem(ref, exc, listed=0)
        return
    for name in sorted(members):
        info = members[name]
        if info.get("type") == "file":
            yield _member(
                ref, "zip", name, size=int(info.get("size") or 0), link=False,
                max_member_bytes=max_member_bytes,
            )  # fmt: skip


def _expand(
    items: Iterator[FileRef | ListingProblem],
    *,
    storage_options: dict[str, Any] | None,
    max_member_bytes: int,
) -> Iterator[FileRef | ListingProblem]:
    for item in items:
        protocol = archive_protocol(item.url) if isinstance(item, FileRef) else None
        if protocol is None or "::" in item.url:
            yield item
        else:
            assert isinstance(item, FileRef)
            lister = _list_tar if protocol == "tar" else _list_zip
            yield from lister(
                item, storage_options=storage_options, max_member_bytes=max_member_bytes
            )


def list_source(
    url: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    max_member_bytes: int = _UNLIMITED,
    secret: str | None = None,
) -> Iterator[FileRef | ListingProblem]:
    """Yield every file under ``url`` (a folder, a file, an archive, an fsspec prefix, or a
    ``dicomweb+http(s)://`` or ``dimse://`` PACS query, which needs ``secret`` to key its
    URLs).

    Archives are expanded into their members (see the module notes).
    """
    text = os.fspath(url)
    from voxlake.ingest import dicomweb, dimse

    pacs = dicomweb if dicomweb.is_dicomweb(text) else dimse if dimse.is_dimse(text) else None
    if pacs is not None:
        if not secret:
            raise SourceError("a PACS source needs the de-identification secret")
        yield from pacs.list_instances(text, secret=secret, storage_options=storage_options)
        return
    if "::" in text:
        yield from _list_members(
            text, storage_options=storage_options, max_member_bytes=max_member_bytes
        )
        return
    local = local_path_of(text)
    items = _walk_local(local) if local is not None else _walk_fsspec(text, storage_options)
    yield from _expand(items, storage_options=storage_options, max_member_bytes=max_member_bytes)


def _list_members(
    url: str, *, storage_options: dict[str, Any] | None, max_member_bytes: int
) -> Iterator[FileRef | ListingProblem]:
    """The members of ``url``, a chained URL naming a member or a folder of an archive
    (``zip://dicom/P001::s3://bucket/a.zip``): the archive listed as a whole source would
    list it (the same caps and path checks), then only that part of it."""
    inner, _, archive = url.partition("::")
    protocol, _, member = inner.partition("://")
    if not member or "::" in archive or archive_protocol(archive) != protocol:
        raise SourceError(
            f"not an archive member URL: {url}",
            code="bad_source",
            hint="name a member or folder of a .zip / .tar archive, e.g."
            " zip://dicom/P001::/data/a.zip, or give the archive itself",
        )
    prefix = member.strip("/")
    found = False
    for item in list_source(
        archive, storage_options=storage_options, max_member_bytes=max_member_bytes
    ):
        name = item.url.partition("::")[0].partition("://")[2]
        if "::" in item.url and name != prefix and not name.startswith(prefix + "/"):
            continue
        found = found or "::" in item.url
        yield item
    if not found:
        raise SourceError(f"no member {member} in {archive}", code="source_not_found")


def open_kwargs(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """fsspec ``open`` keyword arguments for ``url``: chained URLs take the options of
    their innermost protocol under that protocol's name."""
    if not storage_options:
        return {}
    if "::" not in url:
        return dict(storage_options)
    inner = url.rsplit("::", 1)[1]
    protocol = inner.split("://", 1)[0] if "://" in inner else "file"
    return {} if protocol == "file" else {protocol: dict(storage_options)}


def iter_file_batches(
    sources: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int,
    storage_options: dict[str, Any] | None = None,
    max_member_bytes: int = _UNLIMITED,
    secret: str | None = None,
    listed: set[str] | None = None,
) -> Iterator[tuple[list[FileRef], list[ListingProblem]]]:
    """Yield ``(files, problems)`` batches of at most ``batch_size`` files across sources,
    each file once however many of the sources hold it (a folder and a subfolder of it).

    ``listed``: a set the URL of every file and problem yielded is added to (URLs in it
    before are not yielded), for a caller that needs them afterwards: one set of every
    URL on the driver, not two.
    """
    files: list[FileRef] = []
    problems: list[ListingProblem] = []
    if listed is None:
        listed = set()
    for source in sources:
        for item in list_source(
            source,
            storage_options=storage_options,
            max_member_bytes=max_member_bytes,
            secret=secret,
        ):
            if item.url in listed:
                continue
            listed.add(item.url)
            if isinstance(item, ListingProblem):
                problems.append(item)
                continue
            files.append(item)
            if len(files) >= batch_size:
                yield files, problems
                files, problems = [], []
    if files or problems:
        yield files, problems
