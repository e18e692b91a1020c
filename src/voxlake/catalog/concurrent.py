"""What other writers commit to a catalog table while this writer runs.

Two ingests of overlapping sources may run at the same time, on one machine or on many.
Predicate overwrites (merges on keys) conflict in Delta and are retried
(:class:`~voxlake.catalog.tables.CatalogWriter`), but appends never conflict, so both
runs could append the same instance rows. A merge of every batch costs 3-6 times an
append on a large table and grows with it (``docs/reliability.md``), so the ingest driver
appends the instance rows it believes new and uses :class:`ForeignRows` to stay exact:

- before deciding what is new, :meth:`ForeignRows.poll` returns the rows other runs
  committed since the last poll: those keys are merged, not appended, from then on;
- the append is then committed only if the table is still at the version just polled
  (:meth:`~voxlake.catalog.tables.CatalogWriter.append_if_current`). When another run
  committed in between, nothing becomes visible: the driver polls again, drops the keys
  that run added and tries again. No table version (and so no catalog version that pins
  one) ever holds a key twice.

A poll reads only what the table log already lists: the files added since the last
poll (when nobody else writes, this writer's own batch files: the key and ``run_id``
columns of a few hundred rows).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from voxlake.catalog._io import fsspec_options, read_parquet_file
from voxlake.catalog.schema import SCHEMAS
from voxlake.catalog.tables import _delta_options, data_files, table_url

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import pandas as pd

__all__ = ["ForeignRows"]


class ForeignRows:
    """Rows of one table that other writers (other ``run_id`` s) commit after a version.

    Parameters
    ----------
    url
        Catalog root.
    name
        Table name (``"instances"``).
    run_id
        This writer's run id: commits and rows carrying it are not foreign.
    key
        The key column (``"url"``).
    columns
        Columns returned for foreign rows (the key among them); ``run_id`` and ``_file``
        (the data file that holds the row) are added.
    version
        Table version the writer's knowledge starts from (its snapshot); None for nothing
        (every row then counts as foreign until polled).
    storage_options
        fsspec- or delta-rs-style options of a remote catalog.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        name: str,
        *,
        run_id: str,
        key: str,
        columns: Sequence[str],
        version: int | None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        from deltalake import DeltaTable

        self.run_id = run_id
        self.key = key
        self._uri = table_url(url, name)
        self._options = _delta_options(storage_options)
        names = list(dict.fromkeys([*columns, key, "run_id"]))
        self._schema = pa.schema([SCHEMAS[name].field(c) for c in names])
        if version is None:
            self._table = DeltaTable(self._uri, storage_options=self._options)
            self._version, self._files = -1, set[str]()
        else:
            self._table = DeltaTable(self._uri, version=version, storage_options=self._options)
            self._version, self._files = version, set(data_files(self._table, self._uri))

    @property
    def version(self) -> int:
        """The table version the last :meth:`poll` read up to (-1 before the first)."""
        return self._version

    def _empty(self) -> pd.DataFrame:
        frame: pd.DataFrame = self._schema.empty_table().to_pandas()
        frame["_file"] = []
        return frame

    def poll(self) -> pd.DataFrame:
        """Rows other writers added since the last poll (columns, ``run_id``, ``_file``)."""
        import pandas as pd

        self._table.update_incremental()
        current = int(self._table.version())
        if current == self._version:
            return self._empty()
        self._version = current
        files = set(data_files(self._table, self._uri))  # from the log read: no listing
        added, self._files = sorted(files - self._files), files
        options = fsspec_options(self._options)
        frames = []
        for uri in added:  # this writer's own files too (a few small reads): skipped here
            frame = read_parquet_file(uri, schema=self._schema, storage_options=options)
            frame = frame[frame["run_id"] != self.run_id]
            if len(frame):
                frames.append(frame.assign(_file=uri))
        return pd.concat(frames, ignore_index=True) if frames else self._empty()
