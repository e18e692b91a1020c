"""Synthetic DICOM series with known geometry and pixels, for tests and demos.

``generate_sample_data(out, profile="demo")`` is what ``voxlake sample-data`` writes;
``profile="tiny"`` is the same kinds of series, small enough for unit tests. Every
written series knows what a correct ingest must make of it
(:meth:`WrittenSeries.expected_volume`, :meth:`WrittenSeries.expected_affine`), and the
archive knows every identifying value it planted (``SampleManifest.planted_identifiers``).
"""

from __future__ import annotations

from voxlake.testing.phantoms import SeriesSpec, make_phantom
from voxlake.testing.profiles import sample_specs
from voxlake.testing.synthetic import (
    PRIVATE_CREATOR,
    SampleManifest,
    WrittenSeries,
    generate_sample_data,
    write_series,
)

__all__ = [
    "PRIVATE_CREATOR",
    "SampleManifest",
    "SeriesSpec",
    "WrittenSeries",
    "generate_sample_data",
    "make_phantom",
    "sample_specs",
    "write_series",
]
