"""Open stored volumes: the read side shared by the catalog tools and the training stream.

Nothing here imports ingest, dask or pydicom: a GPU node reads volumes with zarr alone.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from voxlake.errors import StoreError
from voxlake.volumes.layout import is_local_url, strip_file_scheme

__all__ = ["open_store", "open_volume", "read_volume", "volume_attributes"]


def open_store(
    url: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    read_only: bool = False,
) -> Any:
    """Return a zarr store for a local path, ``file://`` or any fsspec URL (``s3://``)."""
    import zarr.storage

    text = os.fspath(url)
    if is_local_url(text):
        path = strip_file_scheme(text)
        if read_only and not os.path.isdir(path):
            raise StoreError(f"volume store not found: {path}", code="store_not_found")
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(
        text, storage_options=storage_options or {}, read_only=read_only
    )


def open_volume(
    store_url: str | os.PathLike[str] | Any,
    path: str,
    *,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Open array ``0`` of the volume group at ``path`` (lazy; slicing reads only chunks).

    ``store_url`` may also be an already-open zarr store (for example a wrapped store that
    counts bytes).
    """
    import zarr

    store = (
        open_store(store_url, storage_options=storage_options, read_only=True)
        if isinstance(store_url, (str, os.PathLike))
        else store_url
    )
    try:
        return zarr.open_array(store, path=f"{path.strip('/')}/0", mode="r")
    except Exception as exc:
        raise StoreError(f"volume {path!r} not found in store", code="volume_not_found") from exc


def volume_attributes(
    store_url: str | os.PathLike[str] | Any,
    path: str,
    *,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the group's ``voxlake`` attributes (affine, spacing, provenance, stats)."""
    import zarr

    store = (
        open_store(store_url, storage_options=storage_options, read_only=True)
        if isinstance(store_url, (str, os.PathLike))
        else store_url
    )
    try:
        group = zarr.open_group(store, path=path.strip("/"), mode="r")
    except Exception as exc:
        raise StoreError(f"volume {path!r} not found in store", code="volume_not_found") from exc
    raw = group.attrs.get("voxlake", {})
    attrs: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
    if not attrs.get("complete"):
        raise StoreError(f"volume {path!r} is incomplete", code="incomplete_volume")
    return attrs


def read_volume(
    store_url: str | os.PathLike[str] | Any,
    path: str,
    *,
    storage_options: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a whole volume into memory with its attributes."""
    attrs = volume_attributes(store_url, path, storage_options=storage_options)
    array = open_volume(store_url, path, storage_options=storage_options)
    return np.asarray(array[...]), attrs
