"""From array axes to display axes: the radiological orientation of every panel.

Display axes: 0 runs superior -> inferior, 1 anterior -> posterior, 2 right -> left (the
negative RAS directions), so that with rows drawn top to bottom and columns left to right,
axial panels show anterior up and the patient's right on the left, coronal and sagittal
panels superior up, and sagittal panels anterior on the left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from voxlake.errors import ConfigError

__all__ = ["Geometry", "display_orientation", "geometry_of", "take_plane"]


def display_orientation(affine: np.ndarray | Sequence[float]) -> tuple[tuple[int, ...], ...]:
    """Map array axes (k, j, i) to display axes, following the radiological convention.

    Parameters
    ----------
    affine
        4x4 RAS affine of (i, j, k), as nested lists, a flat row-major list or an array.

    Returns
    -------
    tuple
        ``(display_axis, flip)``, two tuples of three ints indexed by array axis (k, j, i):
        the display axis (0 superior->inferior, 1 anterior->posterior, 2 right->left) the
        array axis runs along, and 1 where its index must be reversed to do so.

    Notes
    -----
    Each affine column is matched to the patient axis it points along most (largest
    absolute direction cosine, assigned greedily so each patient axis is used once),
    like ``nibabel.orientations.io_orientation``.
    """
    matrix = np.asarray(affine, dtype=np.float64).reshape(4, 4)[:3, :3]
    # Columns of the affine are i, j, k; array axes are k, j, i.
    columns = matrix[:, ::-1]
    norms = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(columns)) or np.any(norms == 0):
        raise ConfigError("the affine has a zero or non-finite column", code="bad_affine")
    cosines = np.abs(columns / norms)
    world = [-1, -1, -1]
    free_rows, free_cols = {0, 1, 2}, {0, 1, 2}
    for _ in range(3):
        best = max(((r, c) for r in free_rows for c in free_cols), key=lambda rc: cosines[rc])
        world[best[1]] = best[0]
        free_rows.discard(best[0])
        free_cols.discard(best[1])
    display = tuple(2 - w for w in world)  # world z -> display 0, y -> 1, x -> 2
    # Display axes run toward I, P and L: the negative RAS directions.
    flips = tuple(int(columns[world[a], a] > 0) for a in range(3))
    return display, flips


def _default_affine(spacing: Sequence[float]) -> np.ndarray:
    """RAS affine of a plain axial stack: i toward L, j toward P, k toward S."""
    sz, sy, sx = (float(s) for s in spacing)
    return np.array(
        [[-sx, 0.0, 0.0, 0.0], [0.0, -sy, 0.0, 0.0], [0.0, 0.0, sz, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )


@dataclass(frozen=True)
class Geometry:
    """Shape, spacing and orientation of a volume, in array and display terms."""

    shape: tuple[int, int, int]  # spatial, array order (k, j, i)
    spacing: tuple[float, float, float]  # array order
    affine: np.ndarray
    display: tuple[int, ...]  # display axis of each array axis
    flips: tuple[int, ...]

    def array_axis(self, display_axis: int) -> int:
        """The array axis (0 k, 1 j, 2 i) that runs along ``display_axis``."""
        return self.display.index(display_axis)

    def size(self, display_axis: int) -> int:
        """Voxels along a display axis."""
        return self.shape[self.array_axis(display_axis)]

    def step(self, display_axis: int) -> float:
        """Voxel spacing (mm) along a display axis."""
        return self.spacing[self.array_axis(display_axis)]

    def extent(self, display_axis: int) -> float:
        """Physical extent (mm) along a display axis: voxels x spacing."""
        return self.size(display_axis) * self.step(display_axis)

    def to_display(self, array_axis: int, index: int) -> int:
        """Display index of array index ``index`` along ``array_axis``."""
        n = self.shape[array_axis]
        return n - 1 - index if self.flips[array_axis] else index

    def to_array(self, display_axis: int, index: int) -> int:
        """Array index of display index ``index`` along ``display_axis``."""
        axis = self.array_axis(display_axis)
        n = self.shape[axis]
        return n - 1 - index if self.flips[axis] else index

    def world(self, index: Sequence[int]) -> np.ndarray:
        """RAS millimetres of the voxel centre at array index (k, j, i)."""
        k, j, i = (float(v) for v in index)
        point: np.ndarray = self.affine @ np.array([i, j, k, 1.0])
        return point[:3]


def geometry_of(
    array: Any, spacing: Sequence[float] | None, affine: Any, t: int, *, colour: bool = False
) -> tuple[Geometry, tuple[Any, ...]]:
    """Geometry of a (z, y, x) or (t, z, y, x) array, and the index prefix selecting ``t``.

    With ``colour`` the array is (c, z, y, x) with 3 or 4 channels (RGB, RGBA) and the
    prefix keeps every channel. Without an affine the array is taken as a plain head-first
    axial stack of ``spacing`` (default 1 mm); without a spacing, the affine's column
    lengths are used.
    """
    shape = tuple(int(n) for n in array.shape)
    if len(shape) not in (3, 4):
        raise ConfigError(f"expected a 3D or 4D volume, got shape {shape}", code="bad_shape")
    prefix: tuple[Any, ...] = ()
    if colour:
        if len(shape) != 4 or shape[0] not in (3, 4):
            raise ConfigError(
                f"a colour volume is (c, z, y, x) with 3 or 4 channels, got shape {shape}",
                code="bad_shape",
            )
        prefix = (slice(0, 3),)  # RGB; an alpha channel is not drawn
    elif len(shape) == 4:
        if not 0 <= t < shape[0]:
            raise ConfigError(
                f"time point {t} out of range: the volume has {shape[0]}", code="bad_time_point"
            )
        prefix = (t,)
    spatial = (shape[-3], shape[-2], shape[-1])
    if affine is None:
        steps = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
        matrix = _default_affine(steps)
    else:
        matrix = np.asarray(affine, dtype=np.float64).reshape(4, 4)
        norms = np.linalg.norm(matrix[:3, :3], axis=0)[::-1]  # k, j, i
        steps = (
            tuple(float(s) for s in spacing)
            if spacing is not None
            else tuple(float(n) for n in norms)
        )
    if len(steps) != 3 or not all(math.isfinite(s) and s > 0 for s in steps):
        raise ConfigError(
            f"spacing must be three positive numbers, got {steps}", code="bad_spacing"
        )
    display, flips = display_orientation(matrix)
    geometry = Geometry(spatial, (steps[0], steps[1], steps[2]), matrix, display, flips)
    return geometry, prefix


def take_plane(
    array: Any, geometry: Geometry, prefix: tuple[Any, ...], display_axis: int, index: int
) -> np.ndarray:
    """The display-oriented plane at ``index`` (display coordinates) of a display axis:
    (rows, columns), or (rows, columns, 3) for a colour volume."""
    axis = geometry.array_axis(display_axis)
    selection: list[Any] = [slice(None)] * 3
    selection[axis] = geometry.to_array(display_axis, index)
    data: np.ndarray = np.asarray(array[(*prefix, *selection)])
    if data.ndim == 3:  # channels first: move them last, as imshow wants RGB
        data = np.moveaxis(data, 0, -1)
    rest = [a for a in range(3) if a != axis]
    if geometry.display[rest[0]] > geometry.display[rest[1]]:
        data = data.swapaxes(0, 1)
        rest.reverse()
    for position, array_axis in enumerate(rest):
        if geometry.flips[array_axis]:
            data = np.flip(data, axis=position)
    return data
