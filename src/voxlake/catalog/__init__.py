"""The metadata catalog: Delta Lake tables of instances, volumes, failures, runs, labels."""

from __future__ import annotations

from voxlake.catalog.labels import attach_labels
from voxlake.catalog.query import Catalog, open_catalog
from voxlake.catalog.schema import SCHEMAS, render_schema_markdown
from voxlake.catalog.tables import TABLES, CatalogWriter

__all__ = [
    "SCHEMAS",
    "TABLES",
    "Catalog",
    "CatalogWriter",
    "attach_labels",
    "open_catalog",
    "render_schema_markdown",
]
