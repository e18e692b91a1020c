"""Tri-planar views and slice montages as matplotlib figures (Agg canvas, no pyplot)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from voxlake.errors import ConfigError
from voxlake.viz.orientation import Geometry, geometry_of, take_plane
from voxlake.viz.view import VolumeView
from voxlake.viz.windows import resolve_window

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "IMAGE_FORMATS",
    "Plane",
    "image_format",
    "plot_montage",
    "plot_triplanar",
    "save_figure",
]

Plane = Literal["axial", "coronal", "sagittal"]

# Display axes: 0 runs superior -> inferior, 1 anterior -> posterior, 2 right -> left.
_PLANE_AXIS: dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}
_LETTERS = (("S", "I"), ("A", "P"), ("R", "L"))
_WORLD_NAMES = ("x", "y", "z")


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _unpack(
    volume: VolumeView | Any,
    spacing: Sequence[float] | None,
    affine: Any,
    units: str | None,
    title: str | None,
) -> tuple[Any, Sequence[float] | None, Any, str, str, tuple[float, float] | None, bool]:
    if isinstance(volume, VolumeView):
        return (
            volume.array,
            spacing if spacing is not None else volume.spacing,
            affine if affine is not None else volume.affine,
            units if units is not None else volume.units,
            title if title is not None else volume.title,
            volume.intensity_range,
            volume.colour,
        )
    return volume, spacing, affine, units or "", title or "", None, False


def _limits(
    window: str | tuple[float, float] | None,
    *,
    units: str,
    planes: list[np.ndarray],
    known: tuple[float, float] | None,
    colour: bool,
) -> tuple[float, float, str]:
    """Display limits; a colour volume shows its full stored range unless told otherwise."""
    if colour and window is None:
        dtype = planes[0].dtype
        if np.issubdtype(dtype, np.integer):
            return 0.0, float(np.iinfo(dtype).max), "RGB"
        window = "auto"
    if colour:
        known = None  # the catalog's percentiles pool the channels: take the planes'
    return resolve_window(window, units=units, data=planes, intensity_range=known)


def _colour_bar(figure: Figure, image: Any, cax: Axes, units: str, colour: bool) -> None:
    if colour:  # RGB has no single scale: the slot stays, empty, so panels keep their size
        cax.set_axis_off()
        return
    colorbar = figure.colorbar(image, cax=cax)
    colorbar.set_label(units or "value")


def _draw_plane(
    axes: Axes,
    data: np.ndarray,
    geometry: Geometry,
    rows: int,
    cols: int,
    limits: tuple[float, float],
    *,
    letters: bool = True,
) -> Any:
    height, width = geometry.extent(rows), geometry.extent(cols)
    scalar: dict[str, Any] = {"cmap": "gray", "vmin": limits[0], "vmax": limits[1]}
    if data.ndim == 3:  # RGB: scale to [0, 1] by the limits, as imshow wants
        span = limits[1] - limits[0]
        data = np.clip((data.astype(np.float64) - limits[0]) / span, 0.0, 1.0)
        scalar = {}
    image = axes.imshow(
        data,
        **scalar,
        extent=(0.0, width, height, 0.0),
        origin="upper",
        interpolation="nearest",
        aspect="equal",
    )
    axes.set_xticks([])
    axes.set_yticks([])
    if not letters:
        return image
    style: dict[str, Any] = {"color": "#ffd54f", "fontsize": 9, "fontweight": "bold"}
    top, bottom = _LETTERS[rows]
    left, right = _LETTERS[cols]
    axes.text(0.5, 0.98, top, transform=axes.transAxes, ha="center", va="top", **style)
    axes.text(0.5, 0.02, bottom, transform=axes.transAxes, ha="center", va="bottom", **style)
    axes.text(0.01, 0.5, left, transform=axes.transAxes, ha="left", va="center", **style)
    axes.text(0.99, 0.5, right, transform=axes.transAxes, ha="right", va="center", **style)
    return image


def plot_triplanar(
    volume: VolumeView | Any,
    spacing: Sequence[float] | None = None,
    *,
    affine: Any = None,
    window: str | tuple[float, float] | None = None,
    t: int = 0,
    index: Sequence[int] | None = None,
    units: str | None = None,
    title: str | None = None,
    crosshair: bool = True,
    width: float = 12.0,
) -> Figure:
    """Draw axial, coronal and sagittal planes through one point of a volume.

    Parameters
    ----------
    volume
        A :class:`VolumeView` (from :func:`load_volume`) or an array (z, y, x) or
        (t, z, y, x): NumPy, Zarr or anything sliceable.
    spacing
        Voxel spacing (z, y, x) in mm; default: the view's, else the affine's column
        lengths, else 1 mm.
    affine
        4x4 RAS affine of (i, j, k); default: the view's, else a plain axial stack
        (columns toward the patient's left, rows toward posterior, slices toward
        superior), which is what voxlake stores for a standard head-first axial series.
    window
        See :func:`resolve_window`: ``"ct-soft"``, ``"ct-lung"``, ``"ct-bone"``,
        ``"ct-brain"``, ``"auto"``, ``(level, width)`` or None (CT preset for HU).
    t
        Time point of a 4D (t, z, y, x) volume; a colour (c, z, y, x) volume (a view
        with ``axes == "czyx"``) is drawn in RGB instead, at its full stored range unless
        a window is given.
    index
        Array index (k, j, i) the three planes pass through; default: the centre.
    units
        Units for the colour bar (default: the view's).
    title
        Figure title (default: the view's caption).
    crosshair
        Draw where the other two planes cut each panel.
    width
        Figure width in inches; the height follows from the physical extents.

    Returns
    -------
    matplotlib.figure.Figure
        Three panels labelled ``"axial"``, ``"coronal"`` and ``"sagittal"`` (see
        ``Axes.get_label()``) and a colour bar. Save it with :func:`save_figure`.

    Examples
    --------
    >>> import numpy as np
    >>> figure = plot_triplanar(np.zeros((10, 64, 64)), spacing=(5.0, 0.8, 0.8))
    >>> [axes.get_label() for axes in figure.axes[:3]]
    ['axial', 'coronal', 'sagittal']
    """
    unpacked = _unpack(volume, spacing, affine, units, title)
    array, spacing, affine, units, title, known, colour = unpacked
    geometry, prefix = geometry_of(array, spacing, affine, t, colour=colour)
    centre = [n // 2 for n in geometry.shape] if index is None else [int(v) for v in index]
    if len(centre) != 3 or not all(0 <= c < n for c, n in zip(centre, geometry.shape, strict=True)):
        raise ConfigError(f"index {tuple(centre)} is outside the volume {geometry.shape}")
    cut = [0, 0, 0]  # display index of the cut along each display axis
    for axis in range(3):
        cut[geometry.display[axis]] = geometry.to_display(axis, centre[axis])
    planes = {
        name: take_plane(array, geometry, prefix, axis, cut[axis])
        for name, axis in _PLANE_AXIS.items()
    }
    vmin, vmax, label = _limits(
        window, units=units, planes=list(planes.values()), known=known, colour=colour
    )

    si, ap, rl = (geometry.extent(a) for a in range(3))
    usable = max(width - 1.4, 1.0)
    scale = usable / (rl + rl + ap)  # inches per millimetre, the same in every panel
    height = min(max(scale * max(ap, si) + 1.0, 2.5), 14.0)
    figure = _new_figure(width, height)
    grid = figure.add_gridspec(1, 4, width_ratios=[rl, rl, ap, 0.025 * (rl + rl + ap)])
    image: Any = None
    layout = {"axial": (1, 2), "coronal": (0, 2), "sagittal": (0, 1)}
    for column, (name, (rows, cols)) in enumerate(layout.items()):
        axes = figure.add_subplot(grid[0, column], label=name)
        image = _draw_plane(axes, planes[name], geometry, rows, cols, (vmin, vmax))
        array_axis = geometry.array_axis(_PLANE_AXIS[name])
        position = geometry.world(centre)[2 - _PLANE_AXIS[name]]
        axes.set_title(
            f"{name}  {'kji'[array_axis]}={centre[array_axis]}"
            f"  ({_WORLD_NAMES[2 - _PLANE_AXIS[name]]} {position:.1f} mm)",
            fontsize=9,
        )
        if crosshair:
            style: dict[str, Any] = {
                "color": "#4fc3f7",
                "linewidth": 0.6,
                "alpha": 0.7,
                "linestyle": "--",
            }
            axes.axhline((cut[rows] + 0.5) * geometry.step(rows), **style)
            axes.axvline((cut[cols] + 0.5) * geometry.step(cols), **style)
    colorbar_axes = figure.add_subplot(grid[0, 3], label="colorbar")
    _colour_bar(figure, image, colorbar_axes, units, colour)
    caption = f"{title}   window {label}" if title else f"window {label}"
    if len(prefix) and not colour:
        caption += f"   t={t}"
    figure.suptitle(caption, fontsize=10)
    return figure


def plot_montage(
    volume: VolumeView | Any,
    spacing: Sequence[float] | None = None,
    *,
    affine: Any = None,
    plane: Plane = "axial",
    n_slices: int = 12,
    columns: int | None = None,
    window: str | tuple[float, float] | None = None,
    t: int = 0,
    units: str | None = None,
    title: str | None = None,
    width: float = 12.0,
) -> Figure:
    """Draw evenly spaced slices of one orientation as a grid.

    Parameters
    ----------
    volume, spacing, affine, window, t, units, title, width
        As in :func:`plot_triplanar`.
    plane
        ``"axial"`` (superior first), ``"coronal"`` (anterior first) or ``"sagittal"``
        (right first).
    n_slices
        Slices to show (all of them when the volume has fewer), first and last included.
    columns
        Tiles per row; default: about the square root of ``n_slices``.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per slice, labelled ``"slice <array index>"``, and a colour bar.
    """
    if plane not in _PLANE_AXIS:
        raise ConfigError(f"unknown plane {plane!r}", hint="use axial, coronal or sagittal")
    if n_slices < 1:
        raise ConfigError(f"n_slices must be at least 1, got {n_slices}")
    unpacked = _unpack(volume, spacing, affine, units, title)
    array, spacing, affine, units, title, known, colour = unpacked
    geometry, prefix = geometry_of(array, spacing, affine, t, colour=colour)
    axis = _PLANE_AXIS[plane]
    count = geometry.size(axis)
    chosen = np.unique(np.linspace(0, count - 1, min(n_slices, count)).round().astype(int))
    planes = [take_plane(array, geometry, prefix, axis, int(i)) for i in chosen]
    vmin, vmax, label = _limits(window, units=units, planes=planes, known=known, colour=colour)

    rows_axis, cols_axis = [a for a in range(3) if a != axis]
    ncols = columns or math.ceil(math.sqrt(len(planes)))
    nrows = math.ceil(len(planes) / ncols)
    tile = (width - 1.0) / ncols
    height = min(max(nrows * tile * geometry.extent(rows_axis) / geometry.extent(cols_axis) + 0.8,
                     2.0), 30.0)  # fmt: skip
    figure = _new_figure(width, height)
    grid = figure.add_gridspec(nrows, ncols + 1, width_ratios=[1.0] * ncols + [0.05])
    image: Any = None
    array_axis = geometry.array_axis(axis)
    centre = [n // 2 for n in geometry.shape]
    for position, (display_index, data) in enumerate(zip(chosen, planes, strict=True)):
        index = geometry.to_array(axis, int(display_index))
        axes = figure.add_subplot(grid[position // ncols, position % ncols], label=f"slice {index}")
        image = _draw_plane(
            axes, data, geometry, rows_axis, cols_axis, (vmin, vmax), letters=position == 0
        )
        point = list(centre)
        point[array_axis] = index
        world = geometry.world(point)[2 - axis]
        axes.set_title(
            f"{'kji'[array_axis]}={index}  {_WORLD_NAMES[2 - axis]} {world:.1f} mm", fontsize=8
        )
    colorbar_axes = figure.add_subplot(grid[:, ncols], label="colorbar")
    _colour_bar(figure, image, colorbar_axes, units, colour)
    caption = f"{plane} montage  {title}   window {label}" if title else f"{plane} montage"
    figure.suptitle(caption + (f"   t={t}" if len(prefix) and not colour else ""), fontsize=10)
    return figure


#: File suffixes :func:`save_figure` writes (matplotlib's Agg formats, and its vector ones;
#: pgf is left out: it needs a LaTeX installation).
IMAGE_FORMATS: tuple[str, ...] = (
    "png", "jpg", "jpeg", "tif", "tiff", "webp", "gif", "pdf", "svg", "svgz", "eps", "ps",
)  # fmt: skip


def image_format(out: str | os.PathLike[str]) -> str:
    """The image format the suffix of ``out`` names (``png`` without a suffix).

    Raises
    ------
    ConfigError
        ``bad_image_format`` for a suffix not in :data:`IMAGE_FORMATS`.
    """
    suffix = os.path.splitext(os.fspath(out))[1].lower().lstrip(".")
    if not suffix:
        return "png"
    if suffix not in IMAGE_FORMATS:
        raise ConfigError(
            f"cannot write a .{suffix} image",
            code="bad_image_format",
            hint=f"use one of the suffixes {', '.join('.' + f for f in IMAGE_FORMATS)}",
        )
    return suffix


def save_figure(figure: Figure, out: str | os.PathLike[str], *, dpi: int = 100) -> str:
    """Write ``figure`` in the format its suffix names (:func:`image_format`); return the
    path. Raster images are exactly ``figsize x dpi`` pixels."""
    path = os.fspath(out)
    fmt = image_format(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    figure.savefig(path, dpi=dpi, format=fmt, facecolor="white")
    return path
