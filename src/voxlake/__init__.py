"""voxlake: hospital imaging archives to training data.

Ingest DICOM / NIfTI archives with Dask into an OME-Zarr volume store and a Delta Lake
catalog, query the catalog from notebooks, and stream volumes into PyTorch training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "ingest", "open_catalog"]

if TYPE_CHECKING:
    from voxlake.catalog import open_catalog
    from voxlake.ingest import ingest


def __getattr__(name: str) -> Any:
    # Lazy: `import voxlake` must stay cheap and must not pull dask/pydicom into training.
    if name == "open_catalog":
        from voxlake.catalog import open_catalog

        return open_catalog
    if name == "ingest":
        from voxlake.ingest import ingest

        return ingest
    raise AttributeError(f"module 'voxlake' has no attribute {name!r}")
