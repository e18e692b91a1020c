"""Native pixel data: read an uncompressed grey-level frame without pydicom's decoder.

The header pass already parses every file, so for the common case (native little-endian
syntax, one frame, one sample, MONOCHROME1/2, 8/16/32 bits allocated) it records where
the PixelData value lies in the file (:class:`PixelSpan`). The volume stage then reads
each such slice with one ranged read (:func:`read_span`) instead of reading and parsing
the whole file again, and unpacks it exactly as :func:`native_frame` unpacks a parsed
dataset's value: the same bytes through the same code.

A span is trusted only while the file keeps the size and modification time it had when
it was listed (the same test a re-run uses to decide that a file is unchanged); when
either differs the volume stage reads the whole file and checks its content hash against
the one recorded by the header pass (:mod:`voxlake.ingest.readers.dicom`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Container, Mapping

    import pandas as pd
    import pydicom

    from voxlake.ingest.series import VolumePlan

__all__ = [
    "SPAN_COLUMNS",
    "STORED_SPAN_COLUMNS",
    "PixelSpan",
    "native_frame",
    "pixel_span",
    "read_span",
    "span_columns",
    "stored_spans",
    "syntax_of",
    "unpack_native",
    "with_pixel_spans",
]

NATIVE_LITTLE_ENDIAN = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class PixelSpan:
    """Where one native frame's pixel values lie in its file, and how to unpack them.

    ``size`` and ``mtime`` are the file's when it was listed and ``content_hash`` the
    BLAKE2b of the bytes the header pass read: the volume stage reads the span only while
    size and mtime are unchanged.
    """

    offset: int
    length: int
    dtype: str  # numpy dtype string, e.g. "<i2"
    rows: int
    columns: int
    shift: int  # BitsAllocated - BitsStored: unused high bits to clear or sign-extend
    syntax: str
    size: int
    mtime: float
    content_hash: str


def syntax_of(ds: pydicom.Dataset) -> str:
    """The transfer syntax of a parsed dataset (from its encoding when the meta has none).

    Unlike the volume stage's decoder it leaves ``ds`` as it is (the header pass
    de-identifies and converts it afterwards).
    """
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax:
        return syntax
    implicit, little = ds.original_encoding
    if implicit:
        return "1.2.840.10008.1.2"
    return "1.2.840.10008.1.2.1" if little is not False else "1.2.840.10008.1.2.2"


#: What :func:`_native_layout` reads: Rows, Columns, BitsAllocated, BitsStored,
#: PixelRepresentation, SamplesPerPixel, NumberOfFrames, PhotometricInterpretation.
_LAYOUT_TAGS = (
    0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280103, 0x00280002, 0x00280008,
    0x00280004,
)  # fmt: skip
_Layout = tuple[np.dtype[np.integer], int, int, int]
#: Layouts by the raw bytes of those elements (and the syntax and the value's length).
Layouts = dict[tuple[object, ...], _Layout | None]


def _layout_key(ds: pydicom.Dataset) -> tuple[object, ...] | None:
    """The raw bytes of the elements a layout is made of; None unless all are explicit
    VR and still raw (a converted one may have been changed since it was read)."""
    from pydicom.dataelem import RawDataElement

    key: list[object] = []
    for tag in _LAYOUT_TAGS:
        elem = ds.get_item(tag, keep_deferred=True)
        if elem is None:
            key.append(None)
        elif isinstance(elem, RawDataElement) and elem.VR and elem.value is not None:
            key.append((elem.VR, elem.value, elem.is_little_endian))
        else:
            return None
    return tuple(key)


def _native_layout(
    ds: pydicom.Dataset, syntax: str, nbytes: int, layouts: Layouts | None = None
) -> _Layout | None:
    """(dtype, rows, columns, shift) of a frame ``native_frame`` can unpack, else None.

    `layouts`: what earlier files of the same batch gave (the files of a series share
    it, and converting those elements costs more than the rest), filled here.
    """
    if syntax not in NATIVE_LITTLE_ENDIAN:
        return None
    if layouts is None or (raw := _layout_key(ds)) is None:
        return _read_layout(ds, nbytes)
    key = (syntax, nbytes, raw)
    if key not in layouts:
        layouts[key] = _read_layout(ds, nbytes)
    return layouts[key]


def _read_layout(ds: pydicom.Dataset, nbytes: int) -> _Layout | None:
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation)
        samples = int(ds.SamplesPerPixel)  # pydicom requires it too
        frames = ds.get("NumberOfFrames")
        frames = 1 if frames is None or frames == "" else int(frames)
        photometric = str(ds.PhotometricInterpretation)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if (
        samples != 1
        or frames != 1
        or photometric not in _MONOCHROME
        or allocated not in (8, 16, 32)
        or not 1 <= stored <= allocated
        or signed not in (0, 1)
        or not 0 < rows < 2**16
        or not 0 < columns < 2**16
    ):
        return None  # pydicom decodes it, or reports what is wrong as before
    expected = rows * columns * allocated // 8
    if nbytes != expected and not (expected % 2 and nbytes == expected + 1):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    return dtype, rows, columns, allocated - stored


def unpack_native(
    values: bytes, dtype: np.dtype[np.integer] | str, rows: int, columns: int, shift: int
) -> np.ndarray:
    """Stored values of a native frame: a writeable (rows, columns) array, unused high bits
    cleared (unsigned) or sign-extended (signed), as pydicom's ``correct_unused_bits``."""
    pixels = np.frombuffer(values, dtype=dtype, count=rows * columns).reshape(rows, columns)
    pixels = pixels.copy()  # writeable and independent of the file's bytes, as pydicom's
    if shift:  # arithmetic shift sign-extends
        np.left_shift(pixels, shift, out=pixels)
        np.right_shift(pixels, shift, out=pixels)
    return pixels


def native_frame(ds: pydicom.Dataset, syntax: str) -> np.ndarray | None:
    """The single grey-level frame of a native little-endian file, without pydicom's decoder.

    Gives what ``ds.pixel_array`` gives (stored values, unused high bits cleared or
    sign-extended from BitsStored) for the common case: one frame, one sample,
    MONOCHROME1/2, 8, 16 or 32 bits allocated, pixel data of exactly the declared length
    (plus a padding byte). Returns None for anything else, which then goes through
    pydicom unchanged (its checks and errors included). pydicom's decoder pipeline costs
    about 1 ms per 512 x 512 slice; this is a ``frombuffer`` and a copy.
    """
    if syntax not in NATIVE_LITTLE_ENDIAN:
        return None
    try:
        values = ds.get("PixelData")  # by keyword: the value
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if not isinstance(values, bytes):
        return None
    layout = _native_layout(ds, syntax, len(values))
    if layout is None:
        return None
    return unpack_native(values, *layout)


def pixel_span(
    ds: pydicom.Dataset,
    *,
    file_bytes: int,
    size: int,
    mtime: float,
    content_hash: str,
    layouts: Layouts | None = None,
) -> PixelSpan | None:
    """The span of ``ds``'s pixel data in the file it was parsed from, or None.

    ``ds`` must be freshly parsed from the whole file (not gzipped: offsets are positions
    in the bytes pydicom read), ``file_bytes`` long. None unless :func:`native_frame`
    would unpack the frame: encapsulated (undefined length), big-endian, colour or
    multi-frame pixel data, or a value whose length disagrees with the header, keep the
    pydicom path. Call it before anything reads ``ds.PixelData``: the offset is known only
    while the element is still raw. `layouts`: see :func:`_native_layout`.
    """
    raw = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    offset = getattr(raw, "value_tell", None)  # a RawDataElement: not converted yet
    length = getattr(raw, "length", None)
    if not isinstance(offset, int) or not isinstance(length, int):
        return None
    if length == _UNDEFINED_LENGTH or offset < 0 or offset + length > file_bytes:
        return None
    if file_bytes != size:  # the file changed between listing and reading
        return None
    syntax = syntax_of(ds)
    layout = _native_layout(ds, syntax, length, layouts)
    if layout is None:
        return None
    dtype, rows, columns, shift = layout
    return PixelSpan(
        offset=offset,
        length=length,
        dtype=dtype.str,
        rows=rows,
        columns=columns,
        shift=shift,
        syntax=syntax,
        size=size,
        mtime=mtime,
        content_hash=content_hash,
    )


def read_span(path: str, span: PixelSpan) -> np.ndarray | None:
    """The frame at ``span`` in the local file ``path`` with one ranged read.

    None when the file's size or modification time differs from the span's (it may have
    changed since the header pass: the caller reads and checks the whole file instead).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        info = os.fstat(fd)
        if info.st_size != span.size or info.st_mtime != span.mtime:
            return None
        values = os.pread(fd, span.length, span.offset)
    finally:
        os.close(fd)
    if len(values) != span.length:
        return None
    return unpack_native(values, span.dtype, span.rows, span.columns, span.shift)


#: The ``instances`` columns a span is kept in (with ``url``, ``size``, ``mtime``,
#: ``content_hash``, ``rows``, ``columns`` and ``transfer_syntax_uid``).
SPAN_COLUMNS: Final = ("pixel_offset", "pixel_length", "pixel_dtype", "pixel_shift")
#: Every ``instances`` column :func:`stored_spans` reads, in the order it reads them.
STORED_SPAN_COLUMNS: Final = (
    "url", *SPAN_COLUMNS, "rows", "columns", "transfer_syntax_uid", "size", "mtime",
    "content_hash",
)  # fmt: skip


def span_columns(span: PixelSpan, row: Mapping[str, Any]) -> dict[str, Any]:
    """The ``instances`` columns that keep `span` for later runs (:func:`stored_spans`),
    or none when `row`'s own columns would not give the span back exactly (a file
    without a TransferSyntaxUID, say: its syntax came from the encoding)."""
    same = (
        row.get("rows") == span.rows
        and row.get("columns") == span.columns
        and row.get("transfer_syntax_uid") == span.syntax
        and row.get("size") == span.size
        and row.get("mtime") == span.mtime
        and row.get("content_hash") == span.content_hash
    )
    if not same:
        return {}
    values = (span.offset, span.length, span.dtype, span.shift)
    return dict(zip(SPAN_COLUMNS, values, strict=True))


def stored_spans(
    instances: pd.DataFrame, *, skip: Container[str] = frozenset()
) -> dict[str, PixelSpan]:
    """The spans kept in `instances` rows (those with a ``pixel_offset``), by URL, but for
    the URLs in `skip` (spans the caller has already)."""
    kept = instances[instances["pixel_offset"].notna()]
    spans = {}
    for url, offset, length, dtype, shift, rows, columns, syntax, size, mtime, digest in zip(
        *(kept[name].tolist() for name in STORED_SPAN_COLUMNS), strict=True
    ):
        if url in skip:
            continue
        spans[url] = PixelSpan(
            offset=int(offset), length=int(length), dtype=str(dtype), rows=int(rows),
            columns=int(columns), shift=int(shift), syntax=str(syntax), size=int(size),
            mtime=float(mtime), content_hash=str(digest),
        )  # fmt: skip
    return spans


def with_pixel_spans(plan: VolumePlan, spans: Mapping[str, PixelSpan]) -> VolumePlan:
    """``plan`` with the recorded span on every single-frame slice whose file it matches.

    A span is attached only when its content hash is the slice's (the catalog row the
    plan was made from describes the same bytes the header pass read in this run).
    """
    if not spans:
        return plan
    slices = []
    changed = False
    for ref in plan.slices:
        span = spans.get(ref.url)
        if (
            span is not None
            and ref.frame == 0
            and not ref.mosaic_grid
            and span.content_hash == ref.content_hash
            and ref.pixels is None
        ):
            ref = dataclasses.replace(ref, pixels=span)
            changed = True
        slices.append(ref)
    return dataclasses.replace(plan, slices=tuple(slices)) if changed else plan
