"""NIfTI (.nii, .nii.gz, .hdr/.img), MINC (.mnc) and Analyze (.hdr/.img) through nibabel.

Each file is one volume. The header pass records its shape, affine and data type (from
nibabel, so the affine is exactly what nibabel reports); the planner turns that into a
:class:`~voxlake.ingest.series.VolumePlan`; the worker reads slabs from nibabel's array
proxy. nibabel's (i, j, k[, t]) array becomes the stored (k, j, i) or (t, k, j, i) array
and the affine is kept unchanged. Scaling (NIfTI ``scl_slope``/``scl_inter``, MINC
image ranges) is applied once, to float32. Colour NIfTI (RGB24, RGBA32: nibabel's
structured dtype with fields R, G, B[, A]) becomes (c, k, j, i) uint8, one channel per
field. A 4D MINC, which nibabel returns time first as (t, i, j, k) with an affine over
(i, j, k), becomes (t, k, j, i). Free-text header fields (``descrip``,
``db_name``, ``aux_file``) may hold names and are never copied to the catalog.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import zlib
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from voxlake.errors import DecodeError, NotDicomError
from voxlake.ingest.hashing import content_hash
from voxlake.keys import keyed_hash, volume_id_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd

    from voxlake.ingest.series import PlanFailure, VolumePlan
    from voxlake.ingest.sources import FileRef

__all__ = [
    "IMAGE_FORMATS",
    "image_file_row",
    "minc_time_first",
    "open_image",
    "plan_image_file",
    "read_image_slab",
    "sniff_image_format",
]

#: ``file_format`` values of the files read through nibabel.
IMAGE_FORMATS = ("nifti", "minc", "analyze")
_GZIP = b"\x1f\x8b"
_HDF5 = b"\x89HDF\r\n\x1a\n"


def _name(url: str) -> str:
    """Lower-cased file name of a URL (the member of a chained archive URL)."""
    return url.split("::", 1)[0].rsplit("/", 1)[-1].lower()


def _head(data: bytes, n: int) -> bytes:
    if data[:2] != _GZIP:
        return data[:n]
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, n)
    except zlib.error:
        return b""


def _sibling(url: str, suffix: str) -> str:
    stem, _, rest = url.partition("::")
    base = stem[: stem.rfind(".")] if "." in stem.rsplit("/", 1)[-1] else stem
    upper = stem.rsplit(".", 1)[-1].isupper()
    return base + (suffix.upper() if upper else suffix) + (f"::{rest}" if rest else "")


def _exists(url: str) -> bool:
    from voxlake.ingest.sources import local_path_of

    local = local_path_of(url)
    if local is not None:
        return os.path.exists(local)
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        return bool(fs.exists(path))
    except Exception:
        return False


def sniff_image_format(url: str, data: bytes) -> str | None:
    """``"nifti"``, ``"minc"``, ``"analyze"``, ``"image_data"`` (the ``.img`` half of a pair)
    or None (not one of these: DICOM or unknown), from magic numbers and the file name."""
    name = _name(url)
    head = _head(data, 544)
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1"):
        return "nifti"
    if (
        len(head) >= 8
        and head[4:7] in (b"n+2", b"ni2")
        and head[:4] in (b"\x1c\x02\0\0", b"\0\0\x02\x1c")
    ):
        return "nifti"
    if name.endswith(".hdr") and head[:4] in (b"\x5c\x01\0\0", b"\0\0\x01\x5c"):
        return "analyze"
    if name.endswith(".mnc") and (head[:4] in (b"CDF\x01", b"CDF\x02") or head[:8] == _HDF5):
        return "minc"
    if name.endswith(".img") and _exists(_sibling(url, ".hdr")):
        return "image_data"
    return None


def _load(path: str) -> Any:
    import nibabel as nib

    try:
        return nib.load(path)
    except ImportError as exc:  # MINC2 needs h5py
        raise DecodeError(
            "reading this file needs an optional package (h5py for MINC2)",
            code="codec_unavailable",
        ) from exc
    except Exception as exc:
        raise NotDicomError(
            f"image file cannot be read by nibabel ({type(exc).__name__})", code="bad_image_file"
        ) from exc


@contextmanager
def open_image(
    url: str,
    data: bytes | None = None,
    *,
    max_bytes: int = 1 << 40,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[Any]:
    """Open ``url`` with nibabel (remote files and pairs are staged in a temporary folder)."""
    from voxlake.ingest.file_reads import open_bytes
    from voxlake.ingest.sources import local_path_of

    local = local_path_of(url)
    if local is not None:
        yield _load(local)
        return
    with tempfile.TemporaryDirectory(prefix="voxlake-img-") as tmp:
        parts = [(url, data)]
        if _name(url).endswith(".hdr"):
            parts.append((_sibling(url, ".img"), None))
        for part_url, part in parts:
            if part is None:
                part = open_bytes(part_url, max_bytes=max_bytes, storage_options=storage_options)
            with open(os.path.join(tmp, _name(part_url)), "wb") as handle:
                handle.write(part)
        yield _load(os.path.join(tmp, _name(url)))


def _scaling(img: Any) -> tuple[float, float]:
    proxy = img.dataobj
    slope = getattr(proxy, "slope", 1.0)
    inter = getattr(proxy, "inter", 0.0)
    slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return slope, inter


def _channels(disk: np.dtype[Any]) -> int:
    """Fields of a colour dtype (3 for RGB24, 4 for RGBA32) when all are uint8, else 0."""
    if disk.fields is None:
        return 0
    kinds = {np.dtype(disk.fields[name][0]) for name in disk.names or ()}
    return len(disk.names or ()) if kinds == {np.dtype(np.uint8)} else 0


def minc_time_first(img: Any) -> bool:
    """True for a 4D MINC whose first dimension is time and the others space.

    nibabel keeps MINC's file dimension order (time first, as MINC writes it) and builds
    the affine from the spatial dimensions only.
    """
    import nibabel as nib

    if not isinstance(img, nib.minc1.Minc1Image) or len(img.shape) != 4:
        return False
    names = [str(n) for n in getattr(getattr(img.dataobj, "minc_file", None), "_dim_names", ())]
    return len(names) == 4 and names[0] == "time" and all(n.endswith("space") for n in names[1:])


def _value_dtype(img: Any, disk: np.dtype[Any], image_format: str) -> str:
    """Name of the dtype values are stored as: the on-disk type, float32 once scaled.

    Decided from the header alone (no voxel is read here, so a header declaring a huge
    array reaches the planner's ``max_voxels`` check).
    """
    if disk.fields is not None:
        return "uint8" if _channels(disk) else "structured"
    slope, inter = _scaling(img)
    if disk.kind in "iub" and (image_format == "minc" or (slope, inter) != (1.0, 0.0)):
        return "float32"  # nibabel scales MINC by its image ranges, NIfTI by scl_slope/inter
    if disk.kind == "b":
        return "uint8"
    if disk == np.float16:
        return "float32"
    return disk.newbyteorder("=").name


def _check_length(img: Any, data: bytes, *, max_bytes: int) -> None:
    """Refuse a single-file NIfTI whose data is shorter than its header declares."""
    import nibabel as nib

    offset = getattr(img.dataobj, "offset", None)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or offset is None:
        return  # pairs (.hdr/.img) and MINC: the data lives elsewhere or is self-describing
    itemsize = np.dtype(img.get_data_dtype()).itemsize
    declared = int(offset) + int(np.prod(img.shape, dtype=np.int64)) * itemsize
    if declared > max_bytes:
        return  # absurd sizes are the planner's ``too_large``, refused before any read
    if data[:2] == _GZIP:
        actual = int.from_bytes(data[-4:], "little")  # gzip ISIZE: size mod 2**32
        declared %= 1 << 32
    else:
        actual = len(data)
    if actual < declared:
        raise NotDicomError("image data is shorter than its header declares", code="bad_image_file")


def image_file_row(
    ref: FileRef,
    data: bytes,
    *,
    image_format: str,
    secret: str,
    run_id: str,
    max_bytes: int = 1 << 40,
) -> dict[str, Any]:
    """The ``instances`` row of a NIfTI/MINC/Analyze file (no identifying text copied)."""
    row: dict[str, Any] = {
        "url": ref.url,
        "size": ref.size,
        "mtime": ref.mtime,
        "content_hash": content_hash(data),
        "file_format": image_format,
        "layout": image_format,
        "has_pixels": image_format != "image_data",
        "run_id": run_id,
        "ingested_at": dt.datetime.now(dt.UTC),
    }
    if image_format == "image_data":
        row["header_json"] = json.dumps({"format": "image_data"})
        return row
    with open_image(ref.url, data) as img:
        shape = [int(v) for v in img.shape]
        time_first = minc_time_first(img)
        if time_first:  # recorded in nibabel's NIfTI order (i, j, k, t), like a 4D NIfTI
            shape = [*shape[1:], shape[0]]
        elif image_format == "minc" and len(shape) == 4:
            # nibabel keeps MINC's dimension order; only time first is understood here.
            raise NotDicomError(
                "4D MINC whose first dimension is not time is not stored",
                code="unsupported_dimensions",
            )
        dtype = np.dtype(img.get_data_dtype())
        slope, inter = _scaling(img)
        affine = np.asarray(img.affine, dtype=float)
        zooms = [float(z) for z in img.header.get_zooms()]
        values = _value_dtype(img, dtype, image_format)
        _check_length(img, data, max_bytes=max_bytes)
    key = keyed_hash(secret, "series", f"file:{ref.url}")
    row.update(
        series_key=key,
        instance_key=keyed_hash(secret, "instance", f"file:{ref.url}"),
        array_shape=shape,
        array_affine=[float(v) for v in affine.ravel()],
        array_dtype=values,
        rescale_type="file_scaling" if values == "float32" and dtype.kind != "f" else None,
        rescale_slope=slope,
        rescale_intercept=inter,
        rows=shape[1] if len(shape) > 1 else 1,
        columns=shape[0],
        samples_per_pixel=(_channels(dtype) or 3) if dtype.fields is not None else 1,
        header_json=json.dumps(
            {
                "format": image_format,
                "shape": shape,
                "zooms": zooms,
                "dtype": str(dtype),
                "time_first": time_first,
            }
        ),
    )
    return row


def plan_image_file(row: pd.Series) -> VolumePlan | PlanFailure:
    """Plan the volume of one NIfTI/MINC/Analyze file (driver, pure)."""
    from voxlake.errors import AssemblyError
    from voxlake.ingest.series import PlanFailure, SliceRef, VolumePlan, with_revision

    subject = str(row["series_key"])
    raw_shape = row.get("array_shape")
    shape = [int(v) for v in raw_shape] if raw_shape is not None else []
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    dtype = str(row.get("array_dtype") or "")
    channels = int(row.get("samples_per_pixel") or 1)
    if dtype == "structured" or (channels != 1 and (dtype != "uint8" or len(shape) > 3)):
        error = AssemblyError(
            "only uint8 RGB/RGBA colour images of 2 or 3 dimensions are stored",
            code="color_unsupported",
        )
        return PlanFailure(subject, error)
    if not 2 <= len(shape) <= 4 or min(shape) < 1:
        error = AssemblyError("only 2D, 3D and 4D images are stored", code="unsupported_dimensions")
        return PlanFailure(subject, error)
    shape += [1] * (3 - len(shape))
    scaling = row.get("rescale_type")
    affine = np.asarray(row["array_affine"], dtype=float).reshape(4, 4)
    slope = float(row.get("rescale_slope") or 1.0)
    inter = float(row.get("rescale_intercept") or 0.0)
    stored = dtype
    ours = tuple(shape[::-1]) if channels == 1 else (channels, *shape[::-1])
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    layout = str(row.get("file_format"))
    plan = VolumePlan(
        volume_id=volume_id_for(subject, ""),
        revision="",
        series_key=subject,
        study_key="",
        patient_key="",
        split_key="",
        split_reason="",
        shape=ours,
        slices=(
            SliceRef(
                url=str(row["url"]),
                frame=0,
                slope=slope,
                intercept=inter,
                content_hash=str(row["content_hash"]),
                instance_key=str(row["instance_key"]),
            ),
        ),
        affine=tuple(float(v) for v in affine.ravel()),
        spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])),
        dtype=stored,
        wider_dtype=None,
        units="",
        rows=shape[1],
        columns=shape[0],
        bits_stored=np.dtype(stored).itemsize * 8,
        pixel_representation=1,
        geometry={"slice_spacing_mean": float(zooms[2]), "slice_spacing_max_dev": 0.0},
        metadata={
            "layout": layout,
            "value_scaling": scaling if isinstance(scaling, str) and scaling else "none",
            "source_frames": [0],
            "resampled": False,
        },
        layout=layout,
        axes="czyx" if channels != 1 else "",
    )
    return with_revision(plan)


def read_image_slab(img: Any, z0: int, depth: int, *, dtype: np.dtype[Any]) -> np.ndarray:
    """Slab ``[z0, z0 + depth)`` of an open nibabel image as (t, depth, rows, columns).

    Colour images give (c, depth, rows, columns). nibabel's array proxy applies the
    file's scaling; values are then cast to ``dtype`` (float32 when scaled), refusing a
    lossy cast to an integer type.
    """
    proxy = img.dataobj
    if minc_time_first(img):
        raw = np.asarray(proxy[:, :, :, z0 : z0 + depth]).transpose(1, 2, 3, 0)
    elif len(img.shape) == 2:
        raw = np.asarray(proxy)[:, :, None]
    else:
        raw = np.asarray(proxy[:, :, z0 : z0 + depth, ...])
    if raw.dtype.fields is not None:  # colour: one channel per field, last
        raw = np.stack([raw[name] for name in raw.dtype.names or ()], axis=-1)
    raw = raw.reshape(*raw.shape[:3], -1)
    data = raw.transpose(3, 2, 1, 0)
    if np.issubdtype(dtype, np.integer) and not np.can_cast(data.dtype, dtype):
        info = np.iinfo(dtype)
        if data.size and (
            not np.array_equal(data, np.round(data))
            or data.min() < info.min
            or data.max() > info.max
        ):
            raise DecodeError("image values do not fit the stored type", code="value_overflow")
    return data.astype(dtype, copy=False)
