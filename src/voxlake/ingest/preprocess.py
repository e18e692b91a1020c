"""Optional preprocessing on the workers: resample, clip, N4, foreground crop, pyramid.

Each step takes and returns ``(volume, affine)`` with the volume in (z, y, x) (or
(t, z, y, x)) order and the RAS affine of (i, j, k) = (x, y, z) indices, and appends a
record of what it did, so every stored volume says exactly how it was made (the
``preprocessing`` column and the ``voxlake.preprocessing`` attribute).

Resampling, cropping and N4 need the whole volume in memory: a run with those steps holds
one volume per worker task (plain ingest streams slab by slab). Steps run in a fixed
order: N4 (MR bias field), resample, clip, crop. Pyramid levels are computed by the writer
side from the final volume.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from voxlake.errors import ConfigError, MissingExtraError
from voxlake.volumes.pyramid import downsample2

if TYPE_CHECKING:
    from voxlake.config import PreprocessConfig

__all__ = [
    "apply_preprocessing",
    "clip_intensity",
    "crop_foreground",
    "downsample2",
    "n4_bias_correct",
    "needs_whole_volume",
    "resample_to_spacing",
]


def needs_whole_volume(config: PreprocessConfig) -> bool:
    """True when a step needs the whole volume in memory (not slab by slab)."""
    return bool(
        config.target_spacing or config.n4 or config.crop_threshold is not None or config.clip
    )


def _spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (z, y, x) from the affine's column norms."""
    norms: np.ndarray = np.linalg.norm(affine[:3, :3], axis=0)
    return norms[::-1]


def resample_to_spacing(
    volume: np.ndarray, affine: np.ndarray, target: tuple[float, float, float], *, order: int = 1
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Resample to ``target`` spacing (z, y, x) mm; the field of view is preserved.

    Voxel centres follow ``grid_mode`` (the volume's outer edges stay where they were), and
    the affine is updated exactly: new index m maps to old index (m + 0.5) * s - 0.5 per
    axis, with s = old extent / new extent. Linear interpolation gives float32.
    """
    from scipy import ndimage

    spatial = volume.shape[-3:]
    old = _spacing(affine)
    new_shape = tuple(
        max(1, round(n * o / t)) for n, o, t in zip(spatial, old, target, strict=True)
    )
    scale_zyx = np.array([n / m for n, m in zip(spatial, new_shape, strict=True)])
    out_dtype = np.float32 if order > 0 else volume.dtype

    def one(vol3: np.ndarray) -> np.ndarray:
        zoom = [m / n for n, m in zip(spatial, new_shape, strict=True)]
        return ndimage.zoom(  # type: ignore[no-any-return]
            vol3.astype(np.float32, copy=False), zoom, order=order, mode="nearest", grid_mode=True
        ).astype(out_dtype)

    resampled = np.stack([one(v) for v in volume]) if volume.ndim == 4 else one(volume)
    index_map = np.eye(4)
    scale_xyz = scale_zyx[::-1]
    index_map[:3, :3] = np.diag(scale_xyz)
    index_map[:3, 3] = (scale_xyz - 1) / 2
    record = {
        "step": "resample",
        "target_spacing": list(target),
        "from_spacing": [float(v) for v in old],
        "interpolation": "linear" if order == 1 else "nearest" if order == 0 else f"order{order}",
    }
    return resampled, affine @ index_map, record


def clip_intensity(
    volume: np.ndarray, low: float, high: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """Clip values to ``[low, high]`` (e.g. a HU window), keeping the dtype when it fits."""
    if not low < high:
        raise ConfigError(f"clip range must have low < high, got ({low}, {high})")
    if np.issubdtype(volume.dtype, np.integer):
        info = np.iinfo(volume.dtype)
        low, high = max(low, info.min), min(high, info.max)
    return np.clip(volume, low, high).astype(volume.dtype), {
        "step": "clip",
        "range": [float(low), float(high)],
    }


def crop_foreground(
    volume: np.ndarray, affine: np.ndarray, threshold: float, *, margin: int = 2
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Crop to the bounding box of voxels above ``threshold`` (plus ``margin`` voxels)."""
    reference = volume.max(axis=0) if volume.ndim == 4 else volume
    mask = reference > threshold
    if not mask.any():
        return volume, affine, {"step": "crop_foreground", "threshold": threshold, "empty": True}
    lows, highs = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        lows.append(max(int(hits[0]) - margin, 0))
        highs.append(min(int(hits[-1]) + margin + 1, mask.shape[axis]))
    window: tuple[Any, ...] = (
        Ellipsis,
        *(slice(lo, hi) for lo, hi in zip(lows, highs, strict=True)),
    )
    cropped = volume[window]
    shift = np.eye(4)
    shift[:3, 3] = [lows[2], lows[1], lows[0]]  # (i, j, k) = (x, y, z)
    record = {"step": "crop_foreground", "threshold": threshold, "box_zyx": [lows, highs]}
    return np.ascontiguousarray(cropped), affine @ shift, record


def n4_bias_correct(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """N4 bias-field correction (MR) with SimpleITK; float32 out."""
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise MissingExtraError(
            "N4 bias-field correction needs SimpleITK", hint="pip install 'voxlake[mr]'"
        ) from exc
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    spacing = _spacing(affine)
    image.SetSpacing([float(s) for s in spacing[::-1]])
    mask = sitk.OtsuThreshold(image, 0, 1, 200)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([20, 20])
    corrected = corrector.Execute(image, mask)
    out = np.asarray(sitk.GetArrayFromImage(corrected), dtype=np.float32)
    return out, {"step": "n4", "iterations": [20, 20]}


def apply_preprocessing(
    volume: np.ndarray, affine: np.ndarray, config: PreprocessConfig, *, modality: str = ""
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Run the configured steps in order; return the volume, its affine and the records."""
    records: list[dict[str, Any]] = []
    if config.n4 and modality == "MR" and volume.ndim == 3:
        volume, record = n4_bias_correct(volume, affine)
        records.append(record)
    if config.target_spacing:
        target = tuple(float(v) for v in config.target_spacing)
        if len(target) != 3 or not all(math.isfinite(v) and v > 0 for v in target):
            raise ConfigError("target_spacing must be three positive numbers (z, y, x) in mm")
        order = 0 if config.interpolation == "nearest" else 1
        volume, affine, record = resample_to_spacing(volume, affine, target, order=order)  # type: ignore[arg-type]
        records.append(record)
    if config.clip:
        volume, record = clip_intensity(volume, float(config.clip[0]), float(config.clip[1]))
        records.append(record)
    if config.crop_threshold is not None:
        volume, affine, record = crop_foreground(volume, affine, float(config.crop_threshold))
        records.append(record)
    return volume, affine, records
