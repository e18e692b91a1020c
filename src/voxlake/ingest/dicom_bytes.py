"""Parse DICOM bytes with pydicom: gzip-wrapped or not, with or without a preamble.

Bytes that are not DICOM, are cut short or do not parse raise :class:`NotDicomError`
with a code naming the kind of problem (never a value read from the file).
"""

from __future__ import annotations

import contextlib
import gc
import io
import zlib
from typing import TYPE_CHECKING

from voxlake.errors import NotDicomError, SourceError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pydicom

__all__ = ["PIXEL_KEYWORDS", "parse_dicom_bytes"]

_GZIP_MAGIC = b"\x1f\x8b"
#: The keywords of the elements that hold pixel values.
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


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


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection meanwhile.

    pydicom reads nested sequences by recursion, so a hostile file's nesting drives it to
    the interpreter's recursion limit (where it fails, and the file with it). A collection
    that ran there would call the finalizers of unrelated objects without the stack they
    need: they would fail ("Exception ignored in ...") and their resources stay unreleased.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:  # an overlapping parse in another thread leaves it to the first
            gc.enable()


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
        with _collector_paused():
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
        if any(k in ds for k in PIXEL_KEYWORDS):
            raise NotDicomError("pixel data is truncated", code="truncated_pixel_data")
        raise NotDicomError("file ends inside the DICOM header", code="truncated_header")
    return ds, gzipped
