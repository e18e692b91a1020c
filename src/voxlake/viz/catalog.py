"""Volumes from a catalog: open one lazily by id, or draw it in one call."""

from __future__ import annotations

import math
import os
import shlex
from typing import TYPE_CHECKING, Any

import numpy as np

from voxlake.errors import ConfigError, StoreError
from voxlake.viz.figures import image_format, plot_montage, plot_triplanar, save_figure
from voxlake.viz.view import VolumeView

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["load_volume", "show_volume"]

#: Fewest characters of a volume id accepted as a prefix (a full id is always accepted).
_MIN_PREFIX = 6

#: Lists a catalog's volumes (in the hint for an unknown volume id).
_LIST_SQL = "SELECT volume_id, modality, series_description FROM volumes"


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def load_volume(
    catalog: str | os.PathLike[str],
    volume_id: str | None = None,
    *,
    version: int | None = None,
    store: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    store_storage_options: dict[str, Any] | None = None,
) -> VolumeView:
    """Open a catalogued volume lazily, with its geometry from the catalog row.

    Parameters
    ----------
    catalog
        Catalog root URL.
    volume_id
        Full volume id, or a prefix of at least 6 characters matching exactly one volume;
        None picks the first volume in id order (handy for a first look).
    version
        Catalog version to read (default: the latest).
    store
        Volume store root; default: the row's ``store_url``. Pass it when the store has
        moved, or was given to ``voxlake ingest`` as a path relative to another folder.
    storage_options
        delta-rs options for a remote catalog.
    store_storage_options
        fsspec options for a remote store.

    Returns
    -------
    VolumeView
        The lazy array and its spacing, affine, units and descriptions.

    Raises
    ------
    StoreError
        ``volume_not_found`` (its hint is a shell command listing the ids) or
        ``ambiguous_volume_id``.
    ConfigError
        ``volume_id_too_short`` for a prefix of fewer than 6 characters.
    """
    import pyarrow.compute as pc

    from voxlake.catalog import open_catalog
    from voxlake.volumes import open_volume

    cat = open_catalog(catalog, version=version, storage_options=storage_options)
    ids = sorted(cat.read("volumes", columns=["volume_id"])["volume_id"].astype(str))
    # Quoted so that the hint pastes into a shell whatever the catalog path holds.
    listing = f"voxlake catalog query {shlex.quote(os.fspath(catalog))} {shlex.quote(_LIST_SQL)}"
    if volume_id is None:
        if not ids:
            raise StoreError(
                f"catalog version {cat.version} has no volumes",
                code="volume_not_found",
                hint="ingest some data first: voxlake ingest SOURCE --catalog URL --store URL",
            )
        volume_id = ids[0]
    if volume_id in set(ids):
        matches = [volume_id]
    elif len(volume_id) < _MIN_PREFIX:
        raise ConfigError(
            f"volume id prefix {volume_id!r} is too short: give at least {_MIN_PREFIX}"
            " characters of the id",
            code="volume_id_too_short",
            hint=f"list the ids with: {listing}",
            length=len(volume_id),
            minimum=_MIN_PREFIX,
        )
    else:
        matches = sorted(i for i in ids if i.startswith(volume_id))
    if not matches:
        raise StoreError(
            f"no volume {volume_id!r} in catalog version {cat.version}",
            code="volume_not_found",
            hint=f"list the ids with: {listing}",
        )
    if len(matches) > 1:
        raise StoreError(
            f"volume id prefix {volume_id!r} matches {len(matches)} volumes",
            code="ambiguous_volume_id",
            hint="give more characters of the id",
        )
    row = cat.read("volumes", filter=pc.field("volume_id") == matches[0]).iloc[0]
    store_url = os.fspath(store) if store is not None else str(row["store_url"])
    try:
        array = open_volume(
            store_url, str(row["store_path"]), storage_options=store_storage_options
        )
    except StoreError as exc:
        raise StoreError(
            f"{exc.message} (store {store_url})",
            code=exc.code,
            hint="pass the store location (--store / store=) if it moved or was a relative path",
        ) from exc
    p01, p99 = _float_or_none(row.get("intensity_p01")), _float_or_none(row.get("intensity_p99"))
    return VolumeView(
        array=array,
        spacing=tuple(float(s) for s in row["spacing"][-3:]),  # type: ignore[arg-type]
        affine=np.asarray(row["affine"], dtype=np.float64).reshape(4, 4),
        units=_text(row["units"]),
        modality=_text(row["modality"]),
        volume_id=str(row["volume_id"]),
        description=_text(row["series_description"]),
        intensity_range=(p01, p99) if p01 is not None and p99 is not None else None,
        axes=_text(row.get("axes")),
    )


def show_volume(
    catalog: str | os.PathLike[str],
    volume_id: str | None = None,
    *,
    version: int | None = None,
    window: str | tuple[float, float] | None = None,
    montage: bool = False,
    t: int = 0,
    out: str | os.PathLike[str] | None = None,
    store: str | os.PathLike[str] | None = None,
    dpi: int = 100,
    storage_options: dict[str, Any] | None = None,
    store_storage_options: dict[str, Any] | None = None,
) -> Figure:
    """Draw a catalogued volume: a tri-planar view, or an axial montage.

    Parameters
    ----------
    catalog, volume_id, version, store, storage_options, store_storage_options
        As in :func:`load_volume`.
    window
        See :func:`resolve_window`.
    montage
        Draw an axial slice montage instead of the tri-planar view.
    t
        Time point of a 4D volume.
    out
        Also write the figure to this file, in the format its suffix names (png, jpg,
        pdf, svg...: :data:`~voxlake.viz.IMAGE_FORMATS`).
    dpi
        Resolution of raster images (a 12-inch-wide figure at 100 dpi is 1200 pixels
        wide).

    Returns
    -------
    matplotlib.figure.Figure
        In a notebook, the figure displays itself as the cell's result.

    Examples
    --------
    >>> show_volume("out/catalog", "06fb4940c0e9", window="ct-lung", out="view.png")
    ... # doctest: +SKIP
    """
    if out is not None:
        image_format(out)  # refuse a suffix it cannot write before reading anything
    view = load_volume(
        catalog,
        volume_id,
        version=version,
        store=store,
        storage_options=storage_options,
        store_storage_options=store_storage_options,
    )
    if montage:
        figure = plot_montage(view, window=window, t=t)
    else:
        figure = plot_triplanar(view, window=window, t=t)
    if out is not None:
        save_figure(figure, out, dpi=dpi)
    return figure
