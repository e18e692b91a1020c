"""The OME-Zarr volume store: layout policy, writer and reader."""

from __future__ import annotations

from voxlake.volumes.layout import ArrayLayout, choose_layout, volume_path
from voxlake.volumes.reader import open_store, open_volume, read_volume, volume_attributes
from voxlake.volumes.writer import IntensityStats, VolumeWriter, WriteResult, write_volume

__all__ = [
    "ArrayLayout",
    "IntensityStats",
    "VolumeWriter",
    "WriteResult",
    "choose_layout",
    "open_store",
    "open_volume",
    "read_volume",
    "volume_attributes",
    "volume_path",
    "write_volume",
]
