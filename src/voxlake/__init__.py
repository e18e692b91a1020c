"""voxlake: hospital imaging archives to training data.

Ingest DICOM / NIfTI archives with Dask into an OME-Zarr volume store and a Delta Lake
catalog, query the catalog from notebooks, and stream volumes into PyTorch training.

The entry points live in their subpackages::

    from voxlake.ingest import ingest          # run an ingest
    from voxlake import open_catalog           # query a catalog
    from voxlake.training import VolumeStream  # stream into PyTorch

(``voxlake.ingest`` is a package, so the function is imported from it rather than
re-exported here, where the two would shadow each other.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "open_catalog"]

if TYPE_CHECKING:
    from voxlake.catalog import open_catalog


def __getattr__(name: str) -> Any:
    # Lazy: `import voxlake` must stay cheap and must not pull dask/pydicom into training.
    if name == "open_catalog":
        from voxlake.catalog import open_catalog

        return open_catalog
    raise AttributeError(f"module 'voxlake' has no attribute {name!r}")
