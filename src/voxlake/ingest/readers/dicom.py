"""Build one volume from its plan (Dask task): decode, rescale, stack slab by slab, write.

Memory is bounded by one shard layer (``StoreConfig.shard_depth`` slices) plus the last
two parsed source files, whatever the size of the series. A frame of an enhanced
multi-frame file is decoded on its own (``pydicom.pixels.pixel_array(ds, index=...)``);
a mosaic is decoded once per file and cut into tiles. NIfTI/MINC/Analyze plans are read
through nibabel (:mod:`voxlake.ingest.readers.nifti`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from voxlake.errors import DecodeError, VoxlakeError
from voxlake.ingest import fetched
from voxlake.ingest.dicom_bytes import parse_dicom_bytes
from voxlake.ingest.file_reads import READ_AHEAD_FILES, open_bytes
from voxlake.ingest.hashing import hash_matches
from voxlake.ingest.readers.native import native_frame, read_span
from voxlake.ingest.readers.nifti import IMAGE_FORMATS, open_image, read_image_slab
from voxlake.ingest.readers.rows import volume_row
from voxlake.ingest.sources import local_path_of
from voxlake.volumes.layout import is_local_url, strip_file_scheme, volume_path
from voxlake.volumes.reader import volume_attributes
from voxlake.volumes.writer import VolumeWriter, WriteResult

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import pydicom

    from voxlake.config import PreprocessConfig, StoreConfig
    from voxlake.ingest.readers.native import PixelSpan
    from voxlake.ingest.series import SliceRef, VolumePlan

__all__ = ["FrameDecoder", "build_volume", "decode_frame", "native_frame", "volume_row"]

_UNCOMPRESSED = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
}


def _decode_error(exc: BaseException, syntax: str = "") -> DecodeError:
    from pydicom.uid import UID

    text = str(exc).lower()
    if isinstance(exc, NotImplementedError) and syntax and UID(syntax).name == syntax:
        return DecodeError(  # pydicom names every transfer syntax it knows
            "unknown transfer syntax (private, invalid or newer than the installed pydicom)",
            code="unknown_transfer_syntax",
        )
    if isinstance(exc, (NotImplementedError, RuntimeError)) and (
        "plugin" in text
        or "decoder" in text
        or "no pixel data handler" in text
        or "is not supported" in text
    ):
        return DecodeError(
            "no installed decoder for this transfer syntax",
            code="codec_unavailable",
            hint="install the jpeg extra: pip install 'voxlake[jpeg]'",
        )
    if isinstance(exc, ValueError) and ("length" in text or "bytes of pixel data" in text):
        return DecodeError(
            "pixel data length disagrees with the header", code="pixel_length_mismatch"
        )
    if isinstance(exc, (AttributeError, ValueError)) and "(0028," in text:
        return DecodeError(  # Rows, Columns, BitsAllocated... missing or impossible
            "the image pixel attributes (group 0028) are missing or invalid",
            code="bad_pixel_description",
        )
    return DecodeError(f"pixel data cannot be decoded ({type(exc).__name__})")


def _transfer_syntax(ds: pydicom.Dataset) -> str:
    """The transfer syntax, recorded in the file meta when a file has none (no preamble)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax:
        return syntax
    implicit, little = ds.original_encoding
    uid = (
        ImplicitVRLittleEndian
        if implicit
        else ExplicitVRLittleEndian
        if little is not False
        else ExplicitVRBigEndian
    )
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = uid
    return str(uid)


class FrameDecoder:
    """Decode frames of DICOM files, keeping the last two parsed files (and mosaics).

    A context manager: DIMSE instances are fetched on associations kept open until it
    exits, and files read ahead (:meth:`read_ahead`) in threads that stop with it.
    """

    def __init__(
        self,
        *,
        max_file_bytes: int,
        storage_options: dict[str, Any] | None,
        run_id: str | None = None,
    ) -> None:
        from voxlake.ingest.dimse import Associations

        self.max_file_bytes = max_file_bytes
        self.storage_options = storage_options
        self.run_id = run_id  # PACS instances the run's header tasks kept are read there
        # ... on this task's worker (known in the task's thread, not in read-ahead threads)
        self._worker = fetched.current_worker() if run_id else None
        self.syntaxes: set[str] = set()
        self._files: OrderedDict[str, tuple[pydicom.Dataset, str]] = OrderedDict()
        self._mosaics: OrderedDict[str, np.ndarray] = OrderedDict()
        self._associations = Associations()
        # Read-ahead: the files in the order their frames will be asked for, and reads
        # started for files not asked for yet.
        self._order: dict[str, int] = {}
        self._upcoming: list[str] = []
        self._depth = 0
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[str, Future[bytes]] = {}
        self._asked: set[str] = set()

    def __enter__(self) -> FrameDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._associations.close()

    def read_ahead(self, urls: Sequence[str], depth: int) -> None:
        """Read the files at `urls`, in the order their frames will be asked for, up to
        `depth` files ahead of the one being decoded (threads; each remote file costs a
        round trip). At most twice `depth` files are held read but not yet asked for (a
        4D series asks for its files out of this order, slab by slab)."""
        if depth <= 0 or len(urls) < 2:
            return
        self._upcoming = list(dict.fromkeys(urls))
        self._order = {url: i for i, url in enumerate(self._upcoming)}
        self._depth = depth
        self._pool = ThreadPoolExecutor(depth, thread_name_prefix="voxlake-volume-read")

    def _read(self, url: str) -> bytes:
        data = None
        if self.run_id and self._worker is not None:
            data = fetched.recall(self.run_id, url, self._worker)
        if data is None:
            data = open_bytes(
                url, max_bytes=self.max_file_bytes, storage_options=self.storage_options,
                associations=self._associations,
            )  # fmt: skip
        return data

    def _bytes(self, url: str) -> bytes:
        """The bytes of `url`, read ahead when they were; start reading the next files."""
        started = self._ahead.pop(url, None)
        position = self._order.get(url)
        if self._pool is not None and position is not None:
            self._asked.add(url)
            for later in self._upcoming[position + 1 : position + 1 + self._depth]:
                if len(self._ahead) >= 2 * self._depth:
                    break
                if later not in self._ahead and later not in self._asked:
                    self._ahead[later] = self._pool.submit(self._read, later)
        return started.result() if started is not None else self._read(url)

    def _dataset(self, url: str, *, content_hash: str = "") -> tuple[pydicom.Dataset, str]:
        if url in self._files:
            self._files.move_to_end(url)
            return self._files[url]
        data = self._bytes(url)
        if content_hash and not hash_matches(data, content_hash):
            raise DecodeError("the file changed after its header was read", code="source_changed")
        ds, _ = parse_dicom_bytes(data, max_bytes=self.max_file_bytes)
        syntax = _transfer_syntax(ds)
        self._files[url] = (ds, syntax)
        if len(self._files) > 2:
            self._files.popitem(last=False)
        return ds, syntax

    def frame(self, ref: SliceRef, *, rows: int, columns: int, channels: int = 0) -> np.ndarray:
        """Stored values of one frame (masked to BitsStored, sign-extended), (rows, columns).

        With ``channels`` (colour), (rows, columns, channels) RGB: pydicom converts YBR to
        RGB and either planar configuration to colour-by-pixel; a palette is expanded
        through its lookup table (red, green, blue; an alpha table is not stored).
        """
        from pydicom.pixels import pixel_array  # type: ignore[attr-defined]

        span = ref.pixels
        if span is not None and not channels:
            local = local_path_of(ref.url)
            pixels = None if local is None else self._span(local, span)
            if pixels is not None:
                self.syntaxes.add(span.syntax)
                return self._checked(pixels, rows=rows, columns=columns, channels=0)
            # Size or mtime changed since the listing: only the recorded bytes may be used.
            ds, syntax = self._dataset(ref.url, content_hash=span.content_hash)
        else:
            ds, syntax = self._dataset(ref.url)
        self.syntaxes.add(syntax)
        try:
            if ref.mosaic_grid:
                mosaic = self._mosaics.get(ref.url)
                if mosaic is None:
                    mosaic = ds.pixel_array
                    self._mosaics[ref.url] = mosaic
                    if len(self._mosaics) > 2:
                        self._mosaics.popitem(last=False)
                r0, c0 = divmod(ref.frame, ref.mosaic_grid)
                pixels = mosaic[r0 * rows : (r0 + 1) * rows, c0 * columns : (c0 + 1) * columns]
            elif int(ds.get("NumberOfFrames") or 1) > 1:
                pixels = pixel_array(ds, index=ref.frame)
            else:
                native = native_frame(ds, syntax)
                pixels = ds.pixel_array if native is None else native
            palette = ds.get("PhotometricInterpretation") == "PALETTE COLOR"
            if channels and pixels.ndim == 2 and palette:
                from pydicom.pixels.processing import apply_color_lut

                pixels = apply_color_lut(pixels, ds)[..., :3]
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a codec's Rust panic (pyo3 PanicException) is no Exception
            raise _decode_error(exc, syntax) from exc
        return self._checked(pixels, rows=rows, columns=columns, channels=channels)

    @staticmethod
    def _span(path: str, span: PixelSpan) -> np.ndarray | None:
        try:
            return read_span(path, span)
        except OSError:
            return None  # gone or unreadable now: the whole-file path reports it

    @staticmethod
    def _checked(pixels: np.ndarray, *, rows: int, columns: int, channels: int) -> np.ndarray:
        expected = (rows, columns, channels) if channels else (rows, columns)
        if pixels.shape != expected:
            raise DecodeError(
                f"frame shape {tuple(pixels.shape)} differs from the series' {expected}",
                code="pixel_shape_mismatch",
            )
        return pixels


def decode_frame(
    ref: SliceRef,
    *,
    rows: int,
    columns: int,
    max_file_bytes: int,
    storage_options: dict[str, Any] | None = None,
) -> tuple[np.ndarray, str]:
    """Decode one frame's stored values (masked to BitsStored, sign-extended).

    Returns the 2D array (rows, columns) and the transfer syntax it was decoded from.
    """
    with FrameDecoder(max_file_bytes=max_file_bytes, storage_options=storage_options) as decoder:
        pixels = decoder.frame(ref, rows=rows, columns=columns)
    return pixels, next(iter(decoder.syntaxes), "")


class _Overflow(Exception):
    """Rescaled values do not fit the planned integer dtype."""


def _rescale(
    pixels: np.ndarray, slope: float, intercept: float, dtype: np.dtype[Any]
) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        if slope == 1.0 and intercept == 0.0 and np.can_cast(pixels.dtype, dtype):
            return pixels.astype(dtype, copy=False)
        fast = _rescale_wrapping(pixels, slope, intercept, dtype)
        if fast is not None:
            return fast
        try:
            out = pixels.astype(np.int64) * round(slope) + round(intercept)
        except OverflowError as exc:  # a slope like 1e308 fits no integer
            raise _Overflow from exc
        info = np.iinfo(dtype)
        if out.size and (out.min() < info.min or out.max() > info.max):
            raise _Overflow
        return out.astype(dtype)
    with np.errstate(over="ignore"):
        values = (pixels.astype(np.float64) * slope + intercept).astype(dtype)
    if pixels.dtype.kind != "f" and not np.isfinite(values).all():  # beyond float32
        raise _Overflow
    return values


def _rescale_wrapping(
    pixels: np.ndarray, slope: float, intercept: float, dtype: np.dtype[Any]
) -> np.ndarray | None:
    """Integer rescale computed in ``dtype`` itself, or None where it does not apply.

    ``value * slope + intercept`` is monotonic, so the extremes of the stored values tell
    exactly whether every result fits ``dtype`` (else :class:`_Overflow`). When they do,
    wrap-around arithmetic in ``dtype`` gives the exact results (integers modulo 2^bits
    form a ring), with no int64 temporary four times the slice's size.
    """
    if pixels.dtype.kind not in "iu" or pixels.size == 0:
        return None
    try:
        scale, shift = round(slope), round(intercept)
    except (OverflowError, ValueError):
        return None
    info = np.iinfo(dtype)
    if not (info.min <= scale <= info.max and info.min <= shift <= info.max):
        return None
    ends = (int(pixels.min()) * scale + shift, int(pixels.max()) * scale + shift)
    if min(ends) < info.min or max(ends) > info.max:
        raise _Overflow
    out = pixels.astype(dtype)
    with np.errstate(over="ignore"):
        if scale != 1:
            out *= dtype.type(scale)
        if shift:
            out += dtype.type(shift)
    return out


def _decoder_name(syntaxes: set[str]) -> str:
    import pydicom

    compressed = sorted(s for s in syntaxes if s not in _UNCOMPRESSED)
    base = f"pydicom {pydicom.__version__}"
    if not compressed:
        return base
    return f"{base} + plugins ({', '.join(compressed)})"


def _final_exists(store_url: str, path: str) -> bool:
    if not is_local_url(store_url):
        return True  # a concurrent run may have written it: one metadata read tells
    return os.path.isdir(os.path.join(strip_file_scheme(store_url), *path.split("/")))


def _dicom_slabs(
    plan: VolumePlan, dtype: np.dtype[Any], decoder: FrameDecoder
) -> Callable[[int, int], np.ndarray]:
    n_src = plan.source_shape[-3]
    if plan.dims == "czyx":  # colour: one RGB frame per slice, channels first

        def colour(z0: int, depth: int) -> np.ndarray:
            out = np.empty((plan.shape[0], depth, plan.rows, plan.columns), dtype=dtype)
            for dz in range(depth):
                ref = plan.slices[z0 + dz]
                pixels = decoder.frame(
                    ref, rows=plan.rows, columns=plan.columns, channels=plan.shape[0]
                )
                out[:, dz] = _rescale(pixels, 1.0, 0.0, dtype).transpose(2, 0, 1)
            return out

        return colour
    n_t = plan.shape[0] if len(plan.shape) == 4 else 1

    def source(t: int, z: int) -> np.ndarray:
        ref = plan.slices[t * n_src + z]
        pixels = decoder.frame(ref, rows=plan.rows, columns=plan.columns)
        return _rescale(pixels, ref.slope, ref.intercept, dtype)

    if plan.resample is None:

        def slab(z0: int, depth: int) -> np.ndarray:
            out = np.empty((n_t, depth, plan.rows, plan.columns), dtype=dtype)
            for t in range(n_t):
                for dz in range(depth):
                    out[t, dz] = source(t, z0 + dz)
            return out

        return slab
    distances = np.asarray(plan.resample[0])
    step = plan.resample[1]
    cache: dict[tuple[int, int], np.ndarray] = {}

    def cached(t: int, z: int) -> np.ndarray:
        if (t, z) not in cache:
            cache[(t, z)] = source(t, z)
        return cache[(t, z)]

    def resampled(z0: int, depth: int) -> np.ndarray:
        out = np.empty((n_t, depth, plan.rows, plan.columns), dtype=dtype)
        for dz in range(depth):
            at = (z0 + dz) * step
            found = int(np.searchsorted(distances, at, side="right")) - 1
            low = min(max(found, 0), len(distances) - 2)
            weight = (at - distances[low]) / (distances[low + 1] - distances[low])
            for key in [k for k in cache if k[1] < low]:
                del cache[key]
            for t in range(n_t):
                a, b = cached(t, low), cached(t, low + 1)
                out[t, dz] = (1 - weight) * a + weight * b
        return out

    return resampled


def build_volume(
    plan: VolumePlan,
    *,
    store_url: str,
    store_config: StoreConfig,
    run_id: str,
    max_file_bytes: int,
    storage_options: dict[str, Any] | None = None,
    store_storage_options: dict[str, Any] | None = None,
    preprocess: PreprocessConfig | None = None,
    read_ahead: int | None = None,
) -> dict[str, Any]:
    """Decode, rescale and write one planned volume; return its ``volumes`` row.

    Files on object storage or a PACS are read `read_ahead` files ahead (None: as many
    as a header task reads ahead from there, ``READ_AHEAD_FILES["remote"]``).

    With ``preprocess`` steps that need the whole volume (resample, clip, crop, N4) the
    volume is assembled in memory, processed, then written; otherwise it streams slab by
    slab. Pyramid levels are pooled slab by slab either way.

    If the exact revision is already in a local store (a previous run was killed after
    writing it but before committing its row), it is reused, not rewritten.
    """
    path = volume_path(plan.volume_id, plan.revision)
    if _final_exists(store_url, path):
        try:
            attrs = volume_attributes(store_url, path, storage_options=store_storage_options)
            plan = dataclasses.replace(plan, dtype=str(attrs.get("dtype", plan.dtype)))
            return volume_row(plan, None, {**attrs, "store_url": store_url}, run_id=run_id)
        except VoxlakeError:
            pass  # unreadable leftover: rebuild below (the writer replaces it)
    kwargs: dict[str, Any] = {
        "run_id": run_id,
        "store_url": store_url,
        "path": path,
        "store_config": store_config,
        "max_file_bytes": max_file_bytes,
        "storage_options": storage_options,
        "store_storage_options": store_storage_options,
        "preprocess": preprocess,
        "read_ahead": read_ahead,
    }
    try:
        result, attrs, plan = _write(plan, np.dtype(plan.dtype), **kwargs)
    except _Overflow as exc:
        if plan.wider_dtype is None:
            raise DecodeError(
                "rescaled values overflow the stored type", code="value_overflow"
            ) from exc
        plan = dataclasses.replace(plan, dtype=plan.wider_dtype, wider_dtype=None)
        try:
            result, attrs, plan = _write(plan, np.dtype(plan.dtype), **kwargs)
        except _Overflow as wider:
            raise DecodeError(
                "rescaled values overflow the stored type", code="value_overflow"
            ) from wider
    return volume_row(plan, result, {**attrs, "store_url": store_url}, run_id=run_id)


def _reads_ahead(plan: VolumePlan, read_ahead: int | None) -> tuple[list[str], int]:
    """The files of `plan` to read ahead, and how far: one-slice files that are neither
    local (the page cache serves them, most through their pixel spans) nor archive
    members (one reader at a time). Multi-frame files are not read ahead: their size is
    not known here, and one read serves many slices."""
    urls = [ref.url for ref in plan.slices]
    if len(set(urls)) != len(urls):
        return [], 0
    remote = [url for url in urls if local_path_of(url) is None and "::" not in url]
    return remote, READ_AHEAD_FILES["remote"] if read_ahead is None else read_ahead


def _write(
    plan: VolumePlan,
    dtype: np.dtype[Any],
    *,
    run_id: str,
    store_url: str,
    path: str,
    store_config: StoreConfig,
    max_file_bytes: int,
    storage_options: dict[str, Any] | None,
    store_storage_options: dict[str, Any] | None,
    preprocess: PreprocessConfig | None = None,
    read_ahead: int | None = None,
) -> tuple[WriteResult, dict[str, Any], VolumePlan]:
    from voxlake.ingest.preprocess import apply_preprocessing, needs_whole_volume

    levels = preprocess.pyramid_levels if preprocess is not None else 0
    whole = preprocess is not None and needs_whole_volume(preprocess)
    records: list[Any] = ["resample_equidistant"] if plan.resample is not None else []
    with contextlib.ExitStack() as stack:
        if plan.layout in IMAGE_FORMATS:
            img = stack.enter_context(
                open_image(plan.slices[0].url, storage_options=storage_options)
            )
            decoder_name = f"nibabel {_version('nibabel')}"
            slabs: Callable[[int, int], np.ndarray] = lambda z0, d: read_image_slab(  # noqa: E731
                img, z0, d, dtype=dtype
            )
            syntaxes: set[str] | None = None
        else:
            decoder = stack.enter_context(
                FrameDecoder(
                    max_file_bytes=max_file_bytes, storage_options=storage_options, run_id=run_id
                )
            )
            decoder.read_ahead(*_reads_ahead(plan, read_ahead))
            slabs = _dicom_slabs(plan, dtype, decoder)
            syntaxes = decoder.syntaxes
        if whole:
            assert preprocess is not None
            full = _assemble(plan.shape[-3], slabs)
            volume = full if len(plan.shape) == 4 else full[0]
            affine = np.array(plan.affine).reshape(4, 4)
            volume, affine, steps = apply_preprocessing(
                volume, affine, preprocess, modality=str(plan.metadata.get("modality") or "")
            )
            records += steps
            spacing = np.linalg.norm(affine[:3, :3], axis=0)[::-1]
            plan = dataclasses.replace(
                plan,
                shape=tuple(int(n) for n in volume.shape),
                affine=tuple(float(v) for v in affine.ravel()),
                spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
                dtype=str(volume.dtype),
                wider_dtype=None,
            )
            dtype = volume.dtype
            data4 = volume if volume.ndim == 4 else volume[np.newaxis]
            slabs = lambda z0, d: data4[:, z0 : z0 + d]  # noqa: E731
        if levels:
            records.append({"step": "pyramid", "levels": levels})
        writer = VolumeWriter(
            store_url,
            path,
            shape=plan.shape,
            dtype=dtype,
            config=store_config,
            storage_options=store_storage_options,
            levels=levels,
            axes=plan.dims,
        )
        try:
            _fill(writer, plan, slabs)
            if syntaxes is not None:
                decoder_name = _decoder_name(syntaxes)
            attrs = {
                "volume_id": plan.volume_id,
                "revision": plan.revision,
                "affine": np.array(plan.affine).reshape(4, 4).tolist(),
                "spacing": list(plan.spacing),
                "dtype": str(dtype),
                "units": plan.units,
                "decoder": decoder_name,
                "source_instance_keys": [s.instance_key for s in plan.slices],
                "preprocessing": records,
                "resampled": plan.resample is not None,
                "axes": plan.dims,
            }
            return writer.commit(attrs), attrs, plan
        except BaseException:
            writer.abort()
            raise


def _assemble(n_z: int, slabs: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """The whole volume (t or c, z, y, x), filled slab by slab: one copy of the volume
    (concatenating a list of slabs would hold two)."""
    first = slabs(0, min(128, n_z))
    full = np.empty((first.shape[0], n_z, *first.shape[2:]), first.dtype)
    full[:, : first.shape[1]] = first
    del first
    for z0 in range(128, n_z, 128):
        full[:, z0 : z0 + 128] = slabs(z0, min(128, n_z - z0))
    return full


def _fill(writer: VolumeWriter, plan: VolumePlan, slab: Callable[[int, int], np.ndarray]) -> None:
    n_z = plan.shape[-3]
    for z0 in range(0, n_z, writer.slab_depth):
        depth = min(writer.slab_depth, n_z - z0)
        data = slab(z0, depth)
        writer.write_slab(z0, data if len(plan.shape) == 4 else data[0])
        del data  # before the next slab is decoded: one slab in memory at a time


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"
