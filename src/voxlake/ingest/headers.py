"""Header pass (Dask tasks): read files, sniff, parse, de-identify, build catalog rows.

One task handles a batch of files and returns plain rows: an ``instances`` row for every
usable file and a ``failures`` row for every file that is not. Nothing identifying leaves
this module: keys are keyed hashes, the header is de-identified before it is converted,
and failure messages name the kind of problem, never a value from the file.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import hashlib
import io
import math
import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from voxlake.catalog.schema import DICOM_COLUMNS, Column
from voxlake.catalog.tables import rows_to_table
from voxlake.errors import HeaderError, NotDicomError, SourceError, VoxlakeError
from voxlake.ingest.hashing import content_hash
from voxlake.keys import keyed_hash

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    import pydicom

    from voxlake.config import IngestConfig
    from voxlake.ingest.header_json import HeaderCleaner
    from voxlake.ingest.header_template import TemplateParser
    from voxlake.ingest.readers.native import Layouts, PixelSpan
    from voxlake.ingest.sources import FileRef

__all__ = [
    "HeaderBatch",
    "failure_row",
    "open_bytes",
    "parse_dicom_bytes",
    "read_headers",
]

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_GZIP_MAGIC = b"\x1f\x8b"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class HeaderBatch:
    """Result of one header task.

    ``key_map`` holds ``(kind, key, original identifier)`` triples, filled only when
    ``IngestConfig.key_map_url`` is set (the driver writes them there and nowhere else).
    ``pixel_spans`` maps the URL of each local, native single-frame file to where its
    pixel values lie (in memory only: the driver hands them to this run's volume tasks).
    """

    instances: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    bytes_read: int = 0
    key_map: list[tuple[str, str, str]] = field(default_factory=list)
    pixel_spans: dict[str, PixelSpan] = field(default_factory=dict)


def failure_row(
    *,
    subject: str,
    subject_kind: str,
    error: VoxlakeError,
    run_id: str,
    size: int | None = None,
    mtime: float | None = None,
    stage: str | None = None,
    discriminator: str = "",
) -> dict[str, Any]:
    """Build a ``failures`` row from an error (one row per subject and stage)."""
    stage = stage or error.stage
    failure_id = hashlib.blake2b(
        f"{subject}\x1f{stage}\x1f{discriminator}".encode(), digest_size=16
    ).hexdigest()
    return {
        "failure_id": failure_id,
        "subject": subject,
        "subject_kind": subject_kind,
        "stage": stage,
        "code": error.code,
        "message": error.message,
        "size": size,
        "mtime": mtime,
        "run_id": run_id,
        "ingested_at": dt.datetime.now(dt.UTC),
    }


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


def open_bytes(url: str, *, max_bytes: int, storage_options: dict[str, Any] | None = None) -> bytes:
    """Read a whole file (local path, ``file://`` or fsspec URL), refusing oversize files."""
    from voxlake.ingest.dicomweb import fetch_instance, is_dicomweb
    from voxlake.ingest.sources import local_path_of, open_kwargs

    if is_dicomweb(url):
        return fetch_instance(url, max_bytes=max_bytes, storage_options=storage_options)

    local = local_path_of(url)
    try:
        if local is not None:
            with open(local, "rb") as handle:
                data = _read_capped(handle, max_bytes, size=os.fstat(handle.fileno()).st_size)
        else:
            import fsspec

            with fsspec.open(url, "rb", **open_kwargs(url, storage_options)) as handle:
                data = _read_capped(handle, max_bytes)
    except PermissionError as exc:
        raise SourceError("permission denied", code="permission_denied") from exc
    except OSError as exc:
        raise SourceError(f"cannot read file: {exc.strerror or type(exc).__name__}") from exc
    except Exception as exc:
        from voxlake.volumes.retry import is_transient

        if not is_transient(exc):  # botocore/aiohttp connection errors are not OSErrors
            raise
        raise SourceError(
            f"source unreachable ({type(exc).__name__})", code="source_unreachable"
        ) from exc
    if len(data) > max_bytes:
        raise SourceError(f"file larger than the {max_bytes} byte cap", code="file_too_large")
    return data


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    """Decompress gzip data with a size cap (a gzip bomb is refused, not expanded)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise NotDicomError("corrupt gzip stream", code="corrupt_gzip") from exc
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise SourceError(
            f"gzip member expands beyond the {max_bytes} byte cap", code="decompression_cap"
        )
    return out


class _TruncationWatch(io.BytesIO):
    """A byte stream that notices reads cut short by the end of the data."""

    short_read = False

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        if size is not None and size > 0 and 0 < len(chunk) < size:
            self.short_read = True
        return chunk


def parse_dicom_bytes(data: bytes, *, max_bytes: int) -> tuple[pydicom.Dataset, bool]:
    """Parse DICOM bytes (gzip-wrapped, with or without preamble).

    Returns the dataset and whether the file was gzipped. Raises :class:`NotDicomError`
    when the bytes are not DICOM.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    # pydicom's value validation warns and logs with the offending value quoted, which on
    # a malformed header can be a name or an ID: nothing read from data may reach a log.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    gzipped = data[:2] == _GZIP_MAGIC
    if gzipped:
        data = _gunzip(data, max_bytes)
    if len(data) == 0:
        raise NotDicomError("empty file", code="empty_file")
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    stream = _TruncationWatch(data)
    try:
        ds = pydicom.dcmread(stream, force=not has_preamble)
    except InvalidDicomError as exc:
        raise NotDicomError("not a DICOM file") from exc
    except Exception as exc:
        # Cut short by the end of the data: truncated; failing anywhere else: a bad header.
        cut = stream.short_read or stream.tell() >= len(data)
        code = ("truncated_header" if cut else "bad_header") if has_preamble else "not_dicom"
        raise NotDicomError(
            f"DICOM header cannot be parsed ({type(exc).__name__})", code=code
        ) from exc
    if not has_preamble:
        # A forced parse of arbitrary bytes "succeeds" with junk: demand real DICOM structure.
        try:
            tags = list(ds.keys())
        except Exception as exc:
            raise NotDicomError("not a DICOM file") from exc
        if not tags or not any(0x0008 <= t.group <= 0x0028 for t in tags):
            raise NotDicomError("not a DICOM file")
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise NotDicomError("not a DICOM file")
    if stream.short_read:
        # pydicom stops quietly at EOF; a value cut short means the file was truncated.
        if any(k in ds for k in _PIXEL_KEYWORDS):
            raise NotDicomError("pixel data is truncated", code="truncated_pixel_data")
        raise NotDicomError("file ends inside the DICOM header", code="truncated_header")
    return ds, gzipped


def _convert(column: Column, value: Any) -> Any:
    from pydicom.multival import MultiValue

    if value is None or value == "":
        return None
    many = isinstance(value, (MultiValue, list, tuple))
    kind = column.kind
    if kind == "floats":
        return [float(v) for v in value] if many else [float(value)]
    if kind == "strs":
        return [str(v) for v in value] if many else [str(value)]
    first = value[0] if many else value
    if first is None or first == "":
        return None
    if kind == "str":
        return "\\".join(str(v) for v in value) if many else str(value)
    if kind == "int":
        number = int(float(first))
        return number if -(2**63) <= number < 2**63 else None  # "1e308" fits no column
    if kind == "float":
        return float(first)
    if kind == "date":
        text = str(first)
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    raise ValueError(kind)


@functools.cache
def _column_tags() -> tuple[tuple[Column, int | None], ...]:
    from pydicom.datadict import tag_for_keyword

    return tuple(
        (column, tag_for_keyword(column.keyword) if column.keyword else None)
        for column in DICOM_COLUMNS
    )


@functools.cache
def _column_names() -> tuple[str, ...]:
    return tuple(column.name for column in DICOM_COLUMNS)


@functools.cache
def _columns_by_tag() -> dict[int, tuple[Column, ...]]:
    by_tag: dict[int, tuple[Column, ...]] = {}
    for column, tag in _column_tags():
        if tag is not None:
            by_tag[tag] = (*by_tag.get(tag, ()), column)
    return by_tag


def typed_columns(ds: pydicom.Dataset) -> dict[str, Any]:
    """Typed catalog columns from a (de-identified) dataset; unusable values become null."""
    row: dict[str, Any] = dict.fromkeys(_column_names())
    by_tag = _columns_by_tag()
    # int lookups, no Tag per column (iterating a Dataset would convert its elements)
    for key in ds.keys():  # noqa: SIM118
        columns = by_tag.get(int(key))
        if columns is None:
            continue
        try:
            value = ds[key].value
        except Exception:
            continue  # a malformed optional value must not lose the file
        row.update(_typed_values(columns, value))
    return row


def _typed_values(columns: tuple[Column, ...], value: Any) -> tuple[tuple[str, Any], ...]:
    out = []
    for column in columns:
        try:
            typed = _convert(column, value)
        except Exception:
            typed = None  # a malformed optional value must not lose the file
        out.append((column.name, typed))
    return tuple(out)


def _filled_columns(filled: list[tuple[tuple[str, Any], ...]]) -> dict[str, Any]:
    """What :func:`typed_columns` returns, from the ``_element_columns`` of its elements."""
    row: dict[str, Any] = dict.fromkeys(_column_names())
    for pairs in filled:
        for name, value in pairs:  # the cleaner shares values between files: lists copied
            row[name] = list(value) if isinstance(value, list) else value
    return row


def _element_columns(elem: pydicom.DataElement) -> tuple[tuple[str, Any], ...]:
    """``(column name, typed value)`` of the catalog columns `elem` fills (the cleaner's
    ``values``)."""
    columns = _columns_by_tag().get(int(elem.tag))
    return () if columns is None else _typed_values(columns, elem.value)


def _instance_row(
    ref: FileRef,
    data: bytes,
    *,
    secret: str,
    config: IngestConfig,
    run_id: str,
    cleaner: HeaderCleaner,
    parser: TemplateParser,
    layouts: Layouts,
    key_map: list[tuple[str, str, str]] | None = None,
    pixel_spans: dict[str, PixelSpan] | None = None,
) -> dict[str, Any]:
    from voxlake.ingest.deid import original_identifiers
    from voxlake.ingest.frames import frame_columns
    from voxlake.ingest.readers.native import pixel_span
    from voxlake.ingest.readers.nifti import image_file_row, sniff_image_format
    from voxlake.ingest.sources import local_path_of

    image_format = sniff_image_format(ref.url, data)
    if image_format is not None:  # NIfTI, MINC or Analyze: read through nibabel
        return image_file_row(
            ref,
            data,
            image_format=image_format,
            secret=secret,
            run_id=run_id,
            max_bytes=config.max_file_bytes,
        )
    ds, gzipped = parser.parse(data)
    file_hash = content_hash(data)
    span = None
    local = ref.fetch_url == ref.url and local_path_of(ref.url) is not None
    if pixel_spans is not None and local and not gzipped:  # before PixelData is converted
        span = pixel_span(
            ds, file_bytes=len(data), size=ref.size, mtime=ref.mtime, content_hash=file_hash,
            layouts=layouts,
        )  # fmt: skip
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta or {}).get("MediaStorageSOPClassUID", ""))
    if sop_class == DICOMDIR_SOP_CLASS or (
        meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS
    ):
        raise NotDicomError("DICOMDIR media directory (index, not an image)", code="dicomdir")
    ids = original_identifiers(ds)
    if not ids.get("SOPInstanceUID") and not ids.get("SeriesInstanceUID"):
        raise HeaderError("missing SOPInstanceUID and SeriesInstanceUID", code="missing_uid")
    derived = frame_columns(ds)  # from the original: private tags go in deidentify()
    # header_to_json(deidentify(ds)) and typed_columns() of it, without building it
    header_json, filled = cleaner.clean(ds, ids)
    transfer_syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""

    def key(kind: str, name: str) -> str | None:
        value = ids.get(name, "")
        if not value:
            return None
        hashed = keyed_hash(secret, kind, value)
        if key_map is not None:
            key_map.append((kind, hashed, value.strip().rstrip("\0")))
        return hashed

    row = {
        "url": ref.url,
        "size": ref.size,
        "mtime": ref.mtime,
        "content_hash": file_hash,
        "file_format": "dicom",
        "transfer_syntax_uid": transfer_syntax or None,
        "has_pixels": any(k in ds for k in _PIXEL_KEYWORDS),
        "patient_key": key("patient", "PatientID"),
        "study_key": key("study", "StudyInstanceUID"),
        "series_key": key("series", "SeriesInstanceUID"),
        "instance_key": key("instance", "SOPInstanceUID"),
        "frame_of_reference_key": key("frame_of_reference", "FrameOfReferenceUID"),
        "accession_key": key("accession", "AccessionNumber"),
        **_filled_columns(filled),
        **derived,
        "header_json": header_json,
        "run_id": run_id,
        "ingested_at": dt.datetime.now(dt.UTC),
    }
    if not row["sop_class_uid"] and sop_class:
        row["sop_class_uid"] = sop_class
    for name in ("rescale_slope", "rescale_intercept"):
        value = row[name]
        if value is not None and not math.isfinite(value):  # would be taken as 1 and 0
            raise HeaderError("RescaleSlope or RescaleIntercept is not finite", code="bad_rescale")
    if span is not None and pixel_spans is not None:
        pixel_spans[ref.url] = span
    return row


def read_headers(
    refs: Iterable[FileRef], *, secret: str, config: IngestConfig, run_id: str
) -> HeaderBatch:
    """Parse a batch of files into instance rows and failure rows (runs on a worker)."""
    from voxlake.ingest.header_json import HeaderCleaner
    from voxlake.ingest.header_template import TemplateParser

    refs = list(refs)  # a generator is welcome too: the files are gone over twice
    batch = HeaderBatch()
    # One per batch: series repeat most of their header from file to file.
    cleaner = HeaderCleaner(secret, config.deid, _element_columns)
    parser = TemplateParser(max_bytes=config.max_file_bytes)  # ... and their structure
    layouts: Layouts = {}  # ... and their pixel layout
    for ref, read in _read_ahead(refs, config):
        try:
            data = read.result()
            batch.bytes_read += len(data)
            row = _instance_row(
                ref,
                data,
                secret=secret,
                config=config,
                run_id=run_id,
                cleaner=cleaner,
                parser=parser,
                layouts=layouts,
                key_map=batch.key_map if config.key_map_url else None,
                pixel_spans=batch.pixel_spans,
            )
            batch.instances.append(row)
        except Exception as exc:  # a parser bug on hostile bytes must not stop the run either
            if config.on_error == "raise":
                raise
            error = (
                exc
                if isinstance(exc, VoxlakeError)
                else HeaderError(f"unexpected {type(exc).__name__} while reading header")
            )
            batch.failures.append(_file_failure(ref, error, run_id))
    _drop_rows_the_catalog_cannot_hold(batch, refs, config=config, run_id=run_id)
    return batch


#: Bytes of files read ahead of the one being parsed, at most (the file being parsed
#: and one file of any size are always allowed).
READ_AHEAD_BYTES: Final = 64 << 20
#: Files read ahead of the one being parsed when ``IngestConfig.read_ahead`` is None, by
#: kind of source: local reads wait on the disk, object store and PACS reads on a round
#: trip each, while the parser keeps the core busy. Archive members (zip://M::A,
#: tar://M::A) share one open archive whose reads seek a shared file object: whatever the
#: depth, one thread reads them, one at a time.
READ_AHEAD_FILES: Final = {"local": 2, "remote": 8, "archive": 1}


def _read_ahead(
    refs: list[FileRef], config: IngestConfig
) -> Iterator[tuple[FileRef, Future[bytes]]]:
    """``(ref, future of its bytes)`` in order, the next files being read meanwhile.

    Reads run in threads (file and socket reads release the GIL); a failed read raises
    from its future, in its file's turn. Beyond the file being parsed, at most
    ``config.read_ahead`` (or ``READ_AHEAD_FILES``) files and about ``READ_AHEAD_BYTES``
    (by listed size) are read.
    """
    from voxlake.ingest.sources import local_path_of

    def read(ref: FileRef) -> bytes:
        return open_bytes(
            ref.fetch_url, max_bytes=config.max_file_bytes, storage_options=config.storage_options
        )

    urls = [ref.fetch_url for ref in refs]
    if any("::" in url for url in urls):
        kind = "archive"
    elif all(local_path_of(url) is not None for url in urls):
        kind = "local"
    else:
        kind = "remote"
    depth = READ_AHEAD_FILES[kind] if config.read_ahead is None else config.read_ahead
    threads = 1 if kind == "archive" else max(1, depth)
    upcoming = iter(refs)
    pending: collections.deque[tuple[FileRef, Future[bytes]]] = collections.deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="voxlake-read-ahead") as pool:

        def fill(target: int) -> None:
            queued = sum(max(ref.size, 0) for ref, _ in pending)
            while len(pending) < target and queued < READ_AHEAD_BYTES:
                ref = next(upcoming, None)
                if ref is None:
                    return
                pending.append((ref, pool.submit(read, ref)))
                queued += max(ref.size, 0)

        fill(depth + 1)
        while pending:
            ref, future = pending.popleft()
            fill(depth)  # read ahead while the caller parses this one
            yield ref, future
            fill(1)  # with no read-ahead, the next file is read only now


def _file_failure(ref: FileRef, error: VoxlakeError, run_id: str) -> dict[str, Any]:
    return failure_row(
        subject=ref.url,
        subject_kind="file",
        error=error,
        run_id=run_id,
        size=ref.size,
        mtime=ref.mtime,
        stage="file",
    )


def _drop_rows_the_catalog_cannot_hold(
    batch: HeaderBatch, refs: list[FileRef], *, config: IngestConfig, run_id: str
) -> None:
    """Every row fits the catalog schema, or its file fails here, not the run's commit.

    One conversion checks the whole batch; only when it fails is each row checked alone.
    Messages name the kind of error only: they would quote the header value.
    """
    try:
        rows_to_table("instances", batch.instances)
        return
    except Exception:
        pass
    by_url = {ref.url: ref for ref in refs}
    kept = []
    for row in batch.instances:
        try:
            rows_to_table("instances", [row])
            kept.append(row)
        except Exception as exc:
            error = HeaderError(f"a header value does not fit the catalog ({type(exc).__name__})")
            if config.on_error == "raise":
                raise error from exc
            batch.failures.append(_file_failure(by_url[row["url"]], error, run_id))
    batch.instances = kept
    urls = {row["url"] for row in kept}
    batch.pixel_spans = {u: s for u, s in batch.pixel_spans.items() if u in urls}
