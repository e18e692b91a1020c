"""Multiscale pyramid levels for OME-Zarr: 2x mean-pooled copies of a volume."""

from __future__ import annotations

import numpy as np

__all__ = ["downsample2"]


def downsample2(volume: np.ndarray) -> np.ndarray:
    """2x mean-pool along each spatial axis (odd edges padded by repetition).

    Integer volumes are rounded back to their dtype; the last three axes are (z, y, x).
    A leading axis (time, or colour channels in a (c, z, y, x) volume) is never pooled.
    """
    spatial = volume.shape[-3:]
    pad = [(0, 0)] * (volume.ndim - 3) + [(0, n % 2) for n in spatial]
    padded = np.pad(volume.astype(np.float32), pad, mode="edge")
    shape = (*padded.shape[:-3], *(item for n in padded.shape[-3:] for item in (n // 2, 2)))
    pooled = padded.reshape(shape).mean(axis=(-5, -3, -1))
    out: np.ndarray = (
        np.rint(pooled) if np.issubdtype(volume.dtype, np.integer) else pooled
    ).astype(volume.dtype)
    return out
