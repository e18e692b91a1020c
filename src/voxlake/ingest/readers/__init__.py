"""Pixel readers: turn a volume plan into a stored volume (DICOM, and NIfTI/MINC/Analyze)."""

from __future__ import annotations

from voxlake.ingest.readers.dicom import FrameDecoder, build_volume, decode_frame
from voxlake.ingest.readers.rows import volume_row

__all__ = ["FrameDecoder", "build_volume", "decode_frame", "volume_row"]
