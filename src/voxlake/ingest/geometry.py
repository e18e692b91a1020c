"""Slice geometry (pure numpy): stack order, spacing checks, affines, diffusion directions.

Conventions (PS3.3 C.7.6.2.1.1): patient coordinates are LPS millimetres;
ImageOrientationPatient holds the row direction (along a row, increasing column index)
then the column direction (down a column, increasing row index); PixelSpacing is (row
spacing, column spacing). A stored volume's array index (k, j, i) = (slice, row, column)
and its affine maps (i, j, k, 1) to RAS millimetres, as nibabel reports for NIfTI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LPS_TO_RAS",
    "SliceStack",
    "StackCheck",
    "affine_from_stack",
    "axis_codes",
    "check_stack",
    "image_components",
    "orientation_is_valid",
    "slice_normal",
]

#: Left-multiply an LPS affine by this to get the RAS affine.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Positions closer than this along the normal are the same slice position.
POSITION_TOL_MM = 0.01


def orientation_is_valid(iop: tuple[float, ...], tol: float = 1e-3) -> bool:
    """Whether the two direction cosines are unit length and orthogonal."""
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:6])
    return bool(
        abs(np.linalg.norm(row) - 1) <= tol
        and abs(np.linalg.norm(col) - 1) <= tol
        and abs(float(row @ col)) <= tol
    )


def slice_normal(iop: tuple[float, ...]) -> np.ndarray:
    """The slice normal ``row x col`` (unit length for a valid orientation)."""
    normal: np.ndarray = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:6]))
    return normal / float(np.linalg.norm(normal))


@dataclass(frozen=True)
class SliceStack:
    """Distinct slice positions of one volume, in ascending order along the normal."""

    positions: np.ndarray  # (n, 3) LPS, sorted
    along: np.ndarray  # (n,) position . normal


@dataclass(frozen=True)
class StackCheck:
    """Outcome of :func:`check_stack`: uniform, or why not (code, message)."""

    code: str  # "" when the spacing is uniform
    message: str
    steps: np.ndarray  # (n-1,) steps along the stack direction, mm
    step_vector: np.ndarray  # mean step (LPS mm)
    max_deviation: float  # largest |step - median step|, mm
    tilt_deg: float  # angle between the slice normal and the stack direction


def check_stack(stack: SliceStack, normal: np.ndarray, *, tolerance: float) -> StackCheck:
    """Validate slice spacing and measure tilt.

    The stack direction is the line from the first to the last position; a stack whose
    positions leave that line (more than ``tolerance`` of a step) is ``nonlinear_stack``.
    Steps deviating from the median by more than ``tolerance`` (relative) give
    ``missing_slice`` when every step is a whole multiple of the median, else
    ``irregular_spacing``.
    """
    pos = stack.positions
    span = pos[-1] - pos[0]
    length = float(np.linalg.norm(span))
    direction = span / length if length > 0 else normal
    dist = (pos - pos[0]) @ direction
    steps = np.diff(dist)
    step = float(np.median(steps))
    deviation = np.abs(steps - step)
    max_dev = float(deviation.max()) if len(deviation) else 0.0
    off_line = np.linalg.norm((pos - pos[0]) - np.outer(dist, direction), axis=1)
    cos_tilt = float(abs(direction @ normal))
    tilt = math.degrees(math.acos(min(1.0, cos_tilt)))
    vector = span / (len(pos) - 1)
    code, message = "", ""
    if float(off_line.max()) > tolerance * abs(step) + 1e-3:
        code, message = "nonlinear_stack", "slice positions do not lie on one line"
    elif np.any(deviation > tolerance * abs(step) + 1e-3):
        ratios = steps / step
        whole = np.abs(ratios - np.round(ratios)) < tolerance
        if np.all(whole) and np.any(np.round(ratios) >= 2):
            gaps = int(np.sum(np.round(ratios) - 1))
            code, message = "missing_slice", f"{gaps} slice(s) missing from a regular stack"
        else:
            code = "irregular_spacing"
            message = (
                f"slice spacing is not uniform: steps from {steps.min():.3f} to"
                f" {steps.max():.3f} mm (median {step:.3f} mm)"
            )
    return StackCheck(code, message, steps, vector, max_dev, tilt)


def affine_from_stack(
    iop: tuple[float, ...],
    pixel_spacing: tuple[float, float],
    origin: np.ndarray,
    step_vector: np.ndarray,
) -> np.ndarray:
    """The RAS affine of a stack: columns row dir x column spacing, col dir x row spacing,
    the slice step, the first slice position; then LPS -> RAS."""
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(iop[:3]) * pixel_spacing[1]
    lps[:3, 1] = np.asarray(iop[3:6]) * pixel_spacing[0]
    lps[:3, 2] = step_vector
    lps[:3, 3] = origin
    ras: np.ndarray = LPS_TO_RAS @ lps
    return ras


def image_components(vector: np.ndarray, iop: tuple[float, ...]) -> np.ndarray:
    """An LPS direction expressed along the array axes (i, j, k): (row dir, col dir, normal)."""
    basis = np.stack([np.asarray(iop[:3]), np.asarray(iop[3:6]), slice_normal(iop)])
    out: np.ndarray = basis @ np.asarray(vector, dtype=float)
    return out


_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def axis_codes(affine: np.ndarray) -> tuple[str | None, ...]:
    """The RAS axis codes of a 4x4 affine's voxel axes: ``nibabel``'s ``aff2axcodes``.

    The same algorithm as ``nibabel.orientations.io_orientation``: the closest rotation
    to the affine's direction matrix (polar decomposition), then each voxel axis, the
    strongest first, takes the world axis it moves along most that no stronger axis took.
    Here so that the ingest workers need not import nibabel (and scipy) for one string.
    """
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    zooms = np.sqrt(np.sum(matrix * matrix, axis=0))
    zooms[zooms == 0] = 1
    u, s, vt = np.linalg.svd(matrix / zooms, full_matrices=False)
    keep = s > s.max() * 3 * np.finfo(s.dtype).eps
    rotation = u[:, keep] @ vt[keep]
    codes: list[str | None] = [None, None, None]
    for axis in np.argsort(np.min(-(rotation**2), axis=0), kind="stable"):
        column = rotation[:, axis]
        if np.allclose(column, 0):
            continue
        world = int(np.argmax(np.abs(column)))
        codes[axis] = _AXIS_LABELS[world][int(column[world] > 0)]
        rotation[world, :] = 0
    return tuple(codes)
