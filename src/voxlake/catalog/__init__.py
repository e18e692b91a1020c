"""The metadata catalog: Delta Lake tables of instances, volumes, failures, runs, labels, splits."""

from __future__ import annotations

from voxlake.catalog.engines import isin
from voxlake.catalog.labels import attach_labels
from voxlake.catalog.maintenance import optimize_catalog, vacuum_catalog
from voxlake.catalog.query import Catalog, open_catalog
from voxlake.catalog.schema import SCHEMAS, render_schema_markdown
from voxlake.catalog.splits import save_split
from voxlake.catalog.tables import TABLES, CatalogWriter

__all__ = [
    "SCHEMAS",
    "TABLES",
    "Catalog",
    "CatalogWriter",
    "attach_labels",
    "isin",
    "open_catalog",
    "optimize_catalog",
    "render_schema_markdown",
    "save_split",
    "vacuum_catalog",
]
