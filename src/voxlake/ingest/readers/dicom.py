"""Build one volume from its plan (Dask task): decode, rescale, stack slab by slab, write.

Memory is bounded by one shard layer (``StoreConfig.shard_depth`` slices) plus one decoded
frame, whatever the size of the series.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from voxlake.errors import DecodeError, VoxlakeError
from voxlake.ingest.headers import open_bytes, parse_dicom_bytes
from voxlake.volumes.layout import is_local_url, strip_file_scheme, volume_path
from voxlake.volumes.reader import volume_attributes
from voxlake.volumes.writer import VolumeWriter, WriteResult

if TYPE_CHECKING:
    from voxlake.config import StoreConfig
    from voxlake.ingest.series import SliceRef, VolumePlan

__all__ = ["build_volume", "decode_frame", "volume_row"]

_UNCOMPRESSED = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
}


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
    data = open_bytes(ref.url, max_bytes=max_file_bytes, storage_options=storage_options)
    ds, _ = parse_dicom_bytes(data, max_bytes=max_file_bytes)
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        text = str(exc).lower()
        if "plugin" in text or "decoder" in text or "no pixel data handler" in text:
            raise DecodeError(
                "no installed decoder for this transfer syntax",
                code="codec_unavailable",
                hint="install the jpeg extra: pip install 'voxlake[jpeg]'",
            ) from exc
        raise DecodeError(f"pixel data cannot be decoded ({type(exc).__name__})") from exc
    except ValueError as exc:
        raise DecodeError(
            "pixel data length disagrees with the header", code="pixel_length_mismatch"
        ) from exc
    except Exception as exc:
        raise DecodeError(f"pixel data cannot be decoded ({type(exc).__name__})") from exc
    if pixels.ndim != 2 or pixels.shape != (rows, columns):
        raise DecodeError(
            f"frame shape {tuple(pixels.shape)} differs from the series' {(rows, columns)}",
            code="pixel_shape_mismatch",
        )
    return pixels, syntax


class _Overflow(Exception):
    """Rescaled values do not fit the planned integer dtype."""


def _rescale(
    pixels: np.ndarray, slope: float, intercept: float, dtype: np.dtype[Any]
) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        if slope == 1.0 and intercept == 0.0 and np.can_cast(pixels.dtype, dtype):
            return pixels.astype(dtype, copy=False)
        out = pixels.astype(np.int64) * round(slope) + round(intercept)
        info = np.iinfo(dtype)
        if out.size and (out.min() < info.min or out.max() > info.max):
            raise _Overflow
        return out.astype(dtype)
    return (pixels.astype(np.float64) * slope + intercept).astype(dtype)


def _decoder_name(syntaxes: set[str]) -> str:
    import pydicom

    compressed = sorted(s for s in syntaxes if s not in _UNCOMPRESSED)
    base = f"pydicom {pydicom.__version__}"
    if not compressed:
        return base
    return f"{base} + plugins ({', '.join(compressed)})"


def _final_exists(store_url: str, path: str) -> bool:
    if not is_local_url(store_url):
        return False
    return os.path.isdir(os.path.join(strip_file_scheme(store_url), *path.split("/")))


def volume_row(
    plan: VolumePlan,
    result: WriteResult | None,
    attrs: dict[str, Any],
    *,
    run_id: str,
) -> dict[str, Any]:
    """The ``volumes`` row of a written volume."""
    import nibabel as nib

    stats = result.stats.__dict__ if result is not None else attrs["stats"]
    affine = np.array(plan.affine).reshape(4, 4)
    slopes = {s.slope for s in plan.slices}
    intercepts = {s.intercept for s in plan.slices}
    meta = dict(plan.metadata)
    study_date = meta.pop("study_date", None)
    if study_date is not None and not isinstance(study_date, dt.date):
        study_date = None
    n_t = plan.shape[0] if len(plan.shape) == 4 else 1
    return {
        "volume_id": plan.volume_id,
        "revision": plan.revision,
        "patient_key": plan.patient_key,
        "study_key": plan.study_key,
        "series_key": plan.series_key,
        "split_key": plan.split_key,
        "split_reason": plan.split_reason,
        **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in meta.items()},
        "study_date": study_date,
        "ndim": len(plan.shape),
        "shape": list(plan.shape),
        "spacing": list(plan.spacing),
        "affine": list(plan.affine),
        "orientation": "".join(nib.orientations.aff2axcodes(affine)),
        "dtype": plan.dtype,
        "units": plan.units,
        "rescale_slope": slopes.pop() if len(slopes) == 1 else float("nan"),
        "rescale_intercept": intercepts.pop() if len(intercepts) == 1 else float("nan"),
        "n_instances": len({s.instance_key for s in plan.slices}),
        "n_slices": plan.shape[-3],
        "n_timepoints": n_t,
        **plan.geometry,
        "decoder": attrs.get("decoder", ""),
        "source_instance_keys": [s.instance_key for s in plan.slices],
        "source_hashes": [s.content_hash for s in plan.slices],
        "store_url": attrs.get("store_url", result.store_url if result else ""),
        "store_path": volume_path(plan.volume_id, plan.revision),
        "nbytes": math.prod(plan.shape) * np.dtype(plan.dtype).itemsize,
        "stored_bytes": result.stored_bytes if result else attrs.get("stored_bytes", 0),
        "chunks": list(result.chunks) if result else attrs.get("chunks", []),
        "shards": list(result.shards) if result else attrs.get("shards", []),
        "intensity_min": stats["min"],
        "intensity_max": stats["max"],
        "intensity_mean": stats["mean"],
        "intensity_std": stats["std"],
        "intensity_p01": stats["p01"],
        "intensity_p50": stats["p50"],
        "intensity_p99": stats["p99"],
        "preprocessing": json.dumps(attrs.get("preprocessing", [])),
        "run_id": run_id,
        "ingested_at": dt.datetime.now(dt.UTC),
    }


def build_volume(
    plan: VolumePlan,
    *,
    store_url: str,
    store_config: StoreConfig,
    run_id: str,
    max_file_bytes: int,
    storage_options: dict[str, Any] | None = None,
    store_storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Decode, rescale and write one planned volume; return its ``volumes`` row.

    If the exact revision is already in a local store (a previous run was killed after
    writing it but before committing its row), it is reused, not rewritten.
    """
    path = volume_path(plan.volume_id, plan.revision)
    if _final_exists(store_url, path):
        try:
            attrs = volume_attributes(store_url, path)
            plan = dataclasses.replace(plan, dtype=str(attrs.get("dtype", plan.dtype)))
            return volume_row(plan, None, {**attrs, "store_url": store_url}, run_id=run_id)
        except VoxlakeError:
            pass  # unreadable leftover: rebuild below (the writer replaces it)
    kwargs: dict[str, Any] = {
        "store_url": store_url,
        "path": path,
        "store_config": store_config,
        "max_file_bytes": max_file_bytes,
        "storage_options": storage_options,
        "store_storage_options": store_storage_options,
    }
    try:
        result, attrs = _write(plan, np.dtype(plan.dtype), **kwargs)
    except _Overflow as exc:
        if plan.wider_dtype is None:
            raise DecodeError(
                "rescaled values overflow the stored type", code="value_overflow"
            ) from exc
        plan = dataclasses.replace(plan, dtype=plan.wider_dtype, wider_dtype=None)
        result, attrs = _write(plan, np.dtype(plan.dtype), **kwargs)
    return volume_row(plan, result, {**attrs, "store_url": store_url}, run_id=run_id)


def _write(
    plan: VolumePlan,
    dtype: np.dtype[Any],
    *,
    store_url: str,
    path: str,
    store_config: StoreConfig,
    max_file_bytes: int,
    storage_options: dict[str, Any] | None,
    store_storage_options: dict[str, Any] | None,
) -> tuple[WriteResult, dict[str, Any]]:
    writer = VolumeWriter(
        store_url,
        path,
        shape=plan.shape,
        dtype=dtype,
        config=store_config,
        storage_options=store_storage_options,
    )
    syntaxes: set[str] = set()
    n_z = plan.shape[-3]
    n_t = plan.shape[0] if len(plan.shape) == 4 else 1
    try:
        for z0 in range(0, n_z, writer.slab_depth):
            depth = min(writer.slab_depth, n_z - z0)
            slab = np.empty((n_t, depth, plan.rows, plan.columns), dtype=dtype)
            for t in range(n_t):
                for dz in range(depth):
                    ref = plan.slices[t * n_z + z0 + dz]
                    pixels, syntax = decode_frame(
                        ref,
                        rows=plan.rows,
                        columns=plan.columns,
                        max_file_bytes=max_file_bytes,
                        storage_options=storage_options,
                    )
                    syntaxes.add(syntax)
                    slab[t, dz] = _rescale(pixels, ref.slope, ref.intercept, dtype)
            writer.write_slab(z0, slab if n_t > 1 else slab[0])
        attrs = {
            "volume_id": plan.volume_id,
            "revision": plan.revision,
            "affine": np.array(plan.affine).reshape(4, 4).tolist(),
            "spacing": list(plan.spacing),
            "dtype": str(dtype),
            "units": plan.units,
            "decoder": _decoder_name(syntaxes),
            "source_instance_keys": [s.instance_key for s in plan.slices],
            "preprocessing": [],
        }
        return writer.commit(attrs), attrs
    except BaseException:
        writer.abort()
        raise
