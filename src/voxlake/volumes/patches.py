"""Read a box (patch) of a stored volume: exactly the region asked for, nothing resized.

A patch is given by its origin (z, y, x), which may be negative or run past the end when
the volume is smaller than the patch, and its size (d, h, w). Only the part inside the
volume is read (zarr then fetches only the chunks that part touches); the rest is
reported as padding for the caller to fill after normalisation.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["patch_bounds", "read_patch", "touched_chunks"]

Pad = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _three(values: Sequence[int], what: str) -> tuple[int, int, int]:
    if len(values) != 3:
        raise ValueError(f"{what} must have three entries (z, y, x), got {tuple(values)}")
    a, b, c = (int(v) for v in values)
    return a, b, c


def patch_bounds(
    shape: Sequence[int], origin: Sequence[int], size: Sequence[int]
) -> tuple[tuple[slice, slice, slice], Pad]:
    """The part of a patch inside a (z, y, x) volume, and the padding around it.

    Parameters
    ----------
    shape
        Spatial shape of the volume (the last three axes).
    origin
        First voxel of the patch along each axis (may be negative).
    size
        Patch size along each axis (> 0).

    Returns
    -------
    slices, pad
        ``volume[slices]`` is the part inside the volume; ``np.pad(part, pad)`` has the
        patch's size.
    """
    shape3 = _three(shape[-3:], "shape")
    origin3 = _three(origin, "origin")
    size3 = _three(size, "size")
    if min(size3) < 1:
        raise ValueError(f"patch size must be positive, got {size3}")
    slices: list[slice] = []
    pad: list[tuple[int, int]] = []
    for dim, start, extent in zip(shape3, origin3, size3, strict=True):
        stop = start + extent
        lo, hi = max(start, 0), min(stop, dim)
        if hi <= lo:
            raise ValueError(f"patch at {origin3} of size {size3} lies outside the volume {shape3}")
        slices.append(slice(lo, hi))
        pad.append((lo - start, stop - hi))
    return (slices[0], slices[1], slices[2]), (pad[0], pad[1], pad[2])


def read_patch(
    array: Any, origin: Sequence[int], size: Sequence[int], *, time_index: int = 0
) -> tuple[np.ndarray, Pad]:
    """Read the part of a patch that lies inside a stored volume.

    Parameters
    ----------
    array
        A zarr array (z, y, x) or (t, z, y, x), e.g. from
        :func:`voxlake.volumes.open_volume`; only the chunks the region touches are read.
    origin, size
        The patch (see :func:`patch_bounds`).
    time_index
        Time point of a 4D volume.

    Returns
    -------
    data, pad
        The region inside the volume (stored dtype) and the padding that completes it to
        ``size``.
    """
    slices, pad = patch_bounds(array.shape, origin, size)
    selection: tuple[Any, ...] = (time_index, *slices) if array.ndim == 4 else slices
    return np.asarray(array[selection]), pad


def touched_chunks(
    shape: Sequence[int], chunks: Sequence[int], origin: Sequence[int], size: Sequence[int]
) -> list[tuple[int, int, int]]:
    """Grid coordinates of the (z, y, x) chunks that a patch's in-volume part overlaps.

    With 64^3 chunks an aligned 96^3 patch touches 2^3 = 8 chunks and an unaligned one
    up to 3^3 = 27; this is the set a correct reader fetches, and nothing more.
    """
    slices, _ = patch_bounds(shape, origin, size)
    edges = _three(chunks[-3:], "chunks")
    ranges = [
        range(s.start // edge, (s.stop - 1) // edge + 1)
        for s, edge in zip(slices, edges, strict=True)
    ]
    return [(a, b, c) for a, b, c in itertools.product(*ranges)]
