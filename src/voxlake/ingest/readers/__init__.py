"""Pixel readers: turn a volume plan into a stored volume (DICOM now; nibabel formats next)."""

from __future__ import annotations

from voxlake.ingest.readers.dicom import build_volume, decode_frame, volume_row

__all__ = ["build_volume", "decode_frame", "volume_row"]
