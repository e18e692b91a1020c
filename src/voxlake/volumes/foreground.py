"""Class-location indexes: a small sample of foreground voxel coordinates per volume.

Foreground-weighted patch sampling (nnU-Net's oversampling, MONAI's
``RandCropByPosNegLabeld``) needs to know where the foreground is without reading the
whole volume for every patch. :func:`write_foreground_index` scans a stored volume once,
slab by slab, and stores up to ``max_points`` voxel coordinates per class as a tiny array
``<volume group>/fg_index`` next to the image array ``0``; the training stream reads it
(a few KB) and centres patches on its points.

The stored array is ``int32`` of shape (N, 4), one row ``(class, z, y, x)`` per point.
Points of each class are a uniform sample without replacement of that class's voxels
(bottom-k of random keys), so the index is unbiased and deterministic for a given seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from voxlake.errors import StoreError
from voxlake.volumes.reader import open_store, open_volume

__all__ = [
    "FOREGROUND_INDEX",
    "ForegroundIndex",
    "compute_foreground_index",
    "read_foreground_index",
    "write_foreground_index",
]

#: Name of the index array inside a volume group.
FOREGROUND_INDEX = "fg_index"


@dataclass(frozen=True)
class ForegroundIndex:
    """Sampled foreground coordinates of one volume.

    Attributes
    ----------
    points
        ``int32`` (N, 4): ``(class, z, y, x)`` per row.
    counts
        Foreground voxels per class in the whole volume (before sampling).
    source
        ``"threshold"`` (image values above ``threshold``, class 1) or ``"labels"``.
    threshold
        The threshold used, or None for label maps.
    """

    points: np.ndarray
    counts: dict[int, int] = field(default_factory=dict)
    source: str = "threshold"
    threshold: float | None = None

    @property
    def classes(self) -> list[int]:
        """Classes with at least one point, ascending."""
        return sorted({int(c) for c in self.points[:, 0]}) if len(self.points) else []

    def of_class(self, label: int) -> np.ndarray:
        """(M, 3) coordinates of the points of one class."""
        return self.points[self.points[:, 0] == label, 1:]


def _merge(
    pool: tuple[np.ndarray, np.ndarray], keys: np.ndarray, flat: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    keys = np.concatenate([pool[0], keys])
    flat = np.concatenate([pool[1], flat])
    if keys.size > k:
        keep = np.argpartition(keys, k)[:k]
        keys, flat = keys[keep], flat[keep]
    return keys, flat


def compute_foreground_index(
    array: Any,
    *,
    threshold: float | None = None,
    labels: np.ndarray | None = None,
    max_points: int = 10_000,
    seed: int = 0,
) -> ForegroundIndex:
    """Sample foreground coordinates of a stored (or in-memory) volume, slab by slab.

    Parameters
    ----------
    array
        Zarr array or numpy array, (z, y, x) or (t, z, y, x) (the first time point is
        used).
    threshold
        Foreground = voxels with values strictly above it (class 1). Required unless
        ``labels`` is given.
    labels
        Integer label map of the same spatial shape; every non-zero value is a class.
    max_points
        Points kept per class.
    seed
        Seeds the sampling.

    Returns
    -------
    ForegroundIndex
        The sampled points; empty when there is no foreground.
    """
    if (threshold is None) == (labels is None):
        raise ValueError("give exactly one of threshold (image values) or labels (label map)")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    shape = tuple(int(n) for n in array.shape[-3:])
    if labels is not None and tuple(labels.shape[-3:]) != shape:
        raise ValueError(f"labels shape {labels.shape} differs from the volume's {shape}")
    shards = getattr(array, "shards", None) or getattr(array, "chunks", None) or shape
    depth = max(1, int(shards[-3]))
    plane = shape[1] * shape[2]
    rng = np.random.default_rng(seed)
    pools: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    counts: dict[int, int] = {}
    empty = (np.empty(0), np.empty(0, dtype=np.int64))
    for z0 in range(0, shape[0], depth):
        if labels is not None:
            slab = np.asarray(labels[..., z0 : z0 + depth, :, :])
        else:
            region = array[0, z0 : z0 + depth] if array.ndim == 4 else array[z0 : z0 + depth]
            slab = (np.asarray(region) > threshold).astype(np.uint8)
        classes = [int(c) for c in np.unique(slab) if c != 0]
        for label in classes:
            flat = np.flatnonzero(slab == label).astype(np.int64) + z0 * plane
            counts[label] = counts.get(label, 0) + int(flat.size)
            pools[label] = _merge(pools.get(label, empty), rng.random(flat.size), flat, max_points)
    rows = []
    for label in sorted(pools):
        flat = np.sort(pools[label][1])
        z, y, x = np.unravel_index(flat, shape)
        rows.append(np.stack([np.full(flat.size, label), z, y, x], axis=1))
    points = np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)
    source = "labels" if labels is not None else "threshold"
    return ForegroundIndex(points, counts, source, None if threshold is None else float(threshold))


def write_foreground_index(
    store_url: str | os.PathLike[str] | Any,
    path: str,
    *,
    threshold: float | None = None,
    labels: np.ndarray | None = None,
    max_points: int = 10_000,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> ForegroundIndex:
    """Compute the class-location index of a stored volume and store it beside the image.

    Parameters
    ----------
    store_url
        Volume store (URL, path or open zarr store).
    path
        Group path of the volume (``<volume_id>/<revision>``).
    threshold, labels, max_points, seed
        See :func:`compute_foreground_index`.
    storage_options
        fsspec options for remote stores.

    Returns
    -------
    ForegroundIndex
        What was stored at ``<path>/fg_index`` (overwriting an older index).
    """
    import zarr

    store = (
        open_store(store_url, storage_options=storage_options)
        if isinstance(store_url, (str, os.PathLike))
        else store_url
    )
    index = compute_foreground_index(
        open_volume(store, path),
        threshold=threshold,
        labels=labels,
        max_points=max_points,
        seed=seed,
    )
    try:
        stored = zarr.create_array(
            store,
            name=f"{path.strip('/')}/{FOREGROUND_INDEX}",
            shape=index.points.shape,
            chunks=(max(1, index.points.shape[0]), 4),
            dtype=np.int32,
            fill_value=0,
            overwrite=True,
        )
        if index.points.size:
            stored[...] = index.points
        stored.attrs.update(
            {
                "columns": ["class", "z", "y", "x"],
                "counts": {str(k): v for k, v in index.counts.items()},
                "source": index.source,
                "threshold": index.threshold,
                "max_points": int(max_points),
            }
        )
    except Exception as exc:
        raise StoreError(f"cannot write the foreground index of {path!r}: {exc}") from exc
    return index


def read_foreground_index(
    store_url: str | os.PathLike[str] | Any,
    path: str,
    *,
    storage_options: dict[str, Any] | None = None,
) -> ForegroundIndex | None:
    """The stored class-location index of a volume, or None when it has none."""
    import zarr

    store = (
        open_store(store_url, storage_options=storage_options, read_only=True)
        if isinstance(store_url, (str, os.PathLike))
        else store_url
    )
    try:
        stored = zarr.open_array(store, path=f"{path.strip('/')}/{FOREGROUND_INDEX}", mode="r")
    except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError):
        return None
    attrs: dict[str, Any] = dict(stored.attrs)
    points = np.asarray(stored[...], dtype=np.int32).reshape(-1, 4)
    threshold = attrs.get("threshold")
    return ForegroundIndex(
        points,
        {int(k): int(v) for k, v in dict(attrs.get("counts", {})).items()},
        str(attrs.get("source", "threshold")),
        None if threshold is None else float(threshold),
    )
