"""Header pass (Dask tasks): read files, sniff, parse, de-identify, build catalog rows.

One task handles a batch of files and returns plain rows: an ``instances`` row for every
usable file and a ``failures`` row for every file that is not. Nothing identifying leaves
this module: keys are keyed hashes, the header is de-identified before it is converted,
and failure messages name the kind of problem, never a value from the file.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from voxlake.catalog.schema import DICOM_COLUMNS, Column
from voxlake.catalog.tables import rows_to_table
from voxlake.errors import HeaderError, NotDicomError, VoxlakeError
from voxlake.ingest import fetched
from voxlake.ingest.dicom_bytes import PIXEL_KEYWORDS
from voxlake.ingest.file_reads import read_ahead
from voxlake.ingest.hashing import content_hash
from voxlake.ingest.warning_codes import recording
from voxlake.keys import keyed_hash

if TYPE_CHECKING:
    from collections.abc import Iterable
    from concurrent.futures import Future

    import pyarrow as pa
    import pydicom

    from voxlake.config import IngestConfig
    from voxlake.ingest.header_json import HeaderCleaner
    from voxlake.ingest.header_template import References, TemplateParser
    from voxlake.ingest.readers.native import Layouts, PixelSpan
    from voxlake.ingest.sources import FileRef

__all__ = ["HeaderBatch", "failure_row", "read_headers"]

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclass
class HeaderBatch:
    """Result of one header task.

    ``key_map`` holds ``(kind, key, original identifier)`` triples, filled only when
    ``IngestConfig.key_map_url`` is set (the driver writes them there and nowhere else).
    ``pixel_spans`` maps the URL of each local, native single-frame file to where its
    pixel values lie (in memory only: the driver hands them to this run's volume tasks).
    ``kept`` maps the URL of each PACS instance whose bytes the task kept on its worker
    (:mod:`voxlake.ingest.fetched`) to that worker's address. ``table`` holds the
    instance rows as the catalog's Arrow table (built anyway, to check every row fits);
    the ingest driver's tasks return it alone (:func:`catalog_headers`).
    """

    instances: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    bytes_read: int = 0
    key_map: list[tuple[str, str, str]] = field(default_factory=list)
    pixel_spans: dict[str, PixelSpan] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    table: pa.Table | None = None


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


def _references() -> References[Any]:
    from voxlake.ingest.header_template import References

    return References()


@dataclass
class _RowMemo:
    """What the rows of one header task share: the identifiers and frame columns of the
    last numbered files of its :class:`TemplateParser` (the template and the reference),
    and the keyed hashes of identifiers met before (never leaves the task)."""

    numbered: References[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=_references)
    keys: dict[tuple[str, str], str] = field(default_factory=dict)

    def ids_and_derived(
        self, ds: pydicom.Dataset, parser: TemplateParser
    ) -> tuple[dict[str, str], dict[str, Any]]:
        """``original_identifiers(ds)`` and ``frame_columns(ds)``; for a file built from a
        numbered one, only what its changed elements change is made again."""
        from voxlake.ingest.deid import original_identifiers
        from voxlake.ingest.frames import CLASSIC_UNREAD, frame_columns

        changed = parser.changed
        last = self.numbered.get(parser.base) if changed is not None else None
        if changed is None or last is None:
            ids, derived = original_identifiers(ds), frame_columns(ds)
        else:
            base_ids, base_derived = last
            ids = dict(base_ids)
            if not _id_tags().isdisjoint(changed):
                ids.update(original_identifiers(ds, only=changed))
            if base_derived["layout"] == "classic" and all(
                tag in CLASSIC_UNREAD or tag >> 16 == 2 for tag in changed
            ):
                derived = base_derived  # never changed: rows get copies below
            else:
                derived = frame_columns(ds)
        if parser.generation != parser.base:  # a numbered file
            self.numbered.put(parser.generation, (ids, derived))
        # copies: rows must share no list
        return dict(ids), {k: list(v) if isinstance(v, list) else v for k, v in derived.items()}

    def key(self, secret: str, kind: str, value: str) -> str:
        """``keyed_hash(secret, kind, value)``, remembered."""
        # At most six per file: no larger than the batch's rows, and dropped with them.
        found = self.keys.get((kind, value))
        if found is None:
            found = self.keys[(kind, value)] = keyed_hash(secret, kind, value)
        return found


@functools.cache
def _id_tags() -> frozenset[int]:
    from voxlake.ingest.deid import _ID_TAGS as ID_TAGS

    return frozenset(tag for _, tag in ID_TAGS)


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
    memo: _RowMemo,
    key_map: list[tuple[str, str, str]] | None = None,
    pixel_spans: dict[str, PixelSpan] | None = None,
) -> dict[str, Any]:
    from voxlake.ingest.readers.native import pixel_span, span_columns
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
    # from the original: private tags go in deidentify()
    ids, derived = memo.ids_and_derived(ds, parser)
    if not ids.get("SeriesInstanceUID"):
        # Type 1 in every composite object: without it the file can be in no series, so it
        # would be neither a volume nor a failure. A file cut short right at an element
        # boundary (before group 0020) reads as a whole header that lacks it.
        what = "SeriesInstanceUID"
        if not ids.get("SOPInstanceUID"):
            what = "SOPInstanceUID and SeriesInstanceUID"
        raise HeaderError(
            f"missing {what} (not in the header, or the file ends before it)", code="missing_uid"
        )
    # header_to_json(deidentify(ds)) and typed_columns() of it, without building it
    header_json, filled = cleaner.clean(
        ds, ids, reference=parser.generation, base=parser.base, changed=parser.changed
    )
    transfer_syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""

    def key(kind: str, name: str) -> str | None:
        value = ids.get(name, "")
        if not value:
            return None
        hashed = memo.key(secret, kind, value)
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
        "has_pixels": any(k in ds for k in PIXEL_KEYWORDS),
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
        row.update(span_columns(span, row))
    return row


def read_headers(
    refs: Iterable[FileRef], *, secret: str, config: IngestConfig, run_id: str
) -> HeaderBatch:
    """Parse a batch of files into instance rows and failure rows (runs on a worker)."""
    refs = list(refs)  # a generator is welcome too: the files are gone over twice
    batch = HeaderBatch()
    # PACS instances are kept on this worker for the volume tasks (retrieved once).
    keeper = None
    if config.pacs_cache_bytes and not config.headers_only and any(r.locator for r in refs):
        keeper = fetched.worker_address()
    with recording() as warned:
        memos: _Memos | None = None
        for ref, read in read_ahead(refs, config):
            if memos is None:
                memos = _Memos.new(secret, config)
            start = len(warned.codes)
            row = _read_one(ref, read, batch, memos, secret=secret, config=config,
                            run_id=run_id, keeper=keeper)  # fmt: skip
            if len(warned.codes) > start:
                # A warning is raised where a value is first converted: a file remembered
                # from would spare the next files theirs, and their codes with it.
                memos = None
            if row is not None:
                row["warnings"] = warned.since(start)
    batch.table = _drop_rows_the_catalog_cannot_hold(batch, refs, config=config, run_id=run_id)
    return batch


@dataclass
class _Memos:
    """What a header task remembers from file to file."""

    cleaner: HeaderCleaner  # series repeat most of their header from file to file
    parser: TemplateParser  # ... and their structure
    layouts: Layouts  # ... and their pixel layout
    row: _RowMemo  # ... and their identifiers and frame columns

    @classmethod
    def new(cls, secret: str, config: IngestConfig) -> _Memos:
        from voxlake.ingest.header_json import HeaderCleaner
        from voxlake.ingest.header_template import TemplateParser

        return cls(
            HeaderCleaner(secret, config.deid, _element_columns),
            TemplateParser(max_bytes=config.max_file_bytes),
            {},
            _RowMemo(),
        )


def _read_one(
    ref: FileRef,
    read: Future[bytes],
    batch: HeaderBatch,
    memos: _Memos,
    *,
    secret: str,
    config: IngestConfig,
    run_id: str,
    keeper: str | None,
) -> dict[str, Any] | None:
    """Add `ref`'s instance row (or its failure row) to `batch`; return the instance row."""
    try:
        data = read.result()
        batch.bytes_read += len(data)
        row = _instance_row(
            ref,
            data,
            secret=secret,
            config=config,
            run_id=run_id,
            cleaner=memos.cleaner,
            parser=memos.parser,
            layouts=memos.layouts,
            memo=memos.row,
            key_map=batch.key_map if config.key_map_url else None,
            pixel_spans=batch.pixel_spans,
        )
        batch.instances.append(row)
        if (
            keeper is not None
            and ref.locator is not None
            and fetched.keep(run_id, ref.locator, data, budget=config.pacs_cache_bytes)
        ):
            batch.kept[ref.url] = keeper
        return row
    except Exception as exc:  # a parser bug on hostile bytes must not stop the run either
        if config.on_error == "raise":
            raise
        error = (
            exc
            if isinstance(exc, VoxlakeError)
            else HeaderError(f"unexpected {type(exc).__name__} while reading header")
        )
        batch.failures.append(_file_failure(ref, error, run_id))
        return None


def catalog_headers(
    refs: Iterable[FileRef], *, secret: str, config: IngestConfig, run_id: str
) -> HeaderBatch:
    """:func:`read_headers` as an ingest run's header tasks run it: the instance rows in
    ``table`` only (``instances`` left empty). The driver commits the table as it is
    instead of converting thousands of row dicts itself (about 90 us a row, on the one
    process every worker waits on); pickled, it is about as large as the dicts."""
    batch = read_headers(refs, secret=secret, config=config, run_id=run_id)
    batch.instances = []
    return batch


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
) -> pa.Table:
    """Every row fits the catalog schema, or its file fails here, not the run's commit.

    One conversion checks the whole batch; only when it fails is each row checked alone.
    Messages name the kind of error only: they would quote the header value. Returns the
    table of the rows kept.
    """
    try:
        return rows_to_table("instances", batch.instances)
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
    batch.kept = {u: w for u, w in batch.kept.items() if u in urls}
    return rows_to_table("instances", kept)
