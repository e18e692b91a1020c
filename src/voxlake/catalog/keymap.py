"""The optional key map: from keyed hashes back to the original identifiers.

Keys (``patient_key``, ``study_key``, ...) cannot be linked back to identifiers without
the secret, and even with it only by hashing candidate identifiers. Some projects need the
way back (re-contacting a site about a case, merging with a registry), so an ingest can
write ``(kind, key, original)`` rows to a Delta table at a location the user names
(``IngestConfig.key_map_url``). That table *is* identifying: it never goes under the
catalog or the store (:func:`check_key_map_location` refuses it), and it should be kept
where the original archive is kept, under the same access rules.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from voxlake.catalog.tables import _delta_options
from voxlake.errors import CatalogError, ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    import pandas as pd

__all__ = ["KEY_MAP_SCHEMA", "KeyMapWriter", "check_key_map_location", "read_key_map"]

KEY_MAP_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string(), metadata={"description": "patient, study, series, ..."}),
        pa.field("key", pa.string(), metadata={"description": "The keyed hash in the catalog."}),
        pa.field("original", pa.string(), metadata={"description": "The original identifier."}),
        pa.field("run_id", pa.string(), metadata={"description": "Ingest run that saw it."}),
        pa.field("recorded_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={"description": "voxlake key map: keyed hashes to original identifiers."},
)


def _normalise(url: str) -> str:
    text = url[len("file://") :] if url.startswith("file://") else url
    if "://" in text:
        return text.rstrip("/")
    return os.path.realpath(text)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_key_map_location(
    key_map_url: str | os.PathLike[str],
    *,
    catalog_url: str | os.PathLike[str],
    store_url: str | os.PathLike[str] | None = None,
) -> None:
    """Refuse a key map location inside (or containing) the catalog or the store.

    Raises
    ------
    ConfigError
        The catalog and the store are shared with everyone who may see de-identified
        data; the key map must live apart from both.
    """
    target = _normalise(os.fspath(key_map_url))
    for what, root in (("catalog", catalog_url), ("volume store", store_url)):
        if root is None:
            continue
        base = _normalise(os.fspath(root))
        if _inside(target, base) or _inside(base, target):
            raise ConfigError(
                f"the key map must not be inside the {what} (or contain it)",
                hint="name a location outside the catalog and store, with restricted access",
            )


class KeyMapWriter:
    """Appends ``(kind, key, original)`` rows to the key map Delta table (driver side).

    Rows are deduplicated within a run; a key seen again in a later run may be appended
    again (same values), which :func:`read_key_map` collapses.

    Parameters
    ----------
    url
        Where the key map lives (local path or ``s3://...``), outside catalog and store.
    catalog_url, store_url
        Checked against ``url`` with :func:`check_key_map_location`.
    storage_options
        delta-rs storage options.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        catalog_url: str | os.PathLike[str],
        store_url: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        from deltalake import DeltaTable

        check_key_map_location(url, catalog_url=catalog_url, store_url=store_url)
        self.url = os.fspath(url).rstrip("/")
        self.storage_options = _delta_options(storage_options)
        self._seen: set[tuple[str, str]] = set()
        if "://" not in self.url:
            os.makedirs(self.url, exist_ok=True)
        try:
            self._table = DeltaTable.create(
                self.url,
                KEY_MAP_SCHEMA,
                mode="ignore",
                name="voxlake_key_map",
                storage_options=self.storage_options,
            )
        except Exception as exc:
            # The message names the location only; never any identifier.
            raise CatalogError(
                f"cannot create the key map table: {type(exc).__name__}", code="key_map"
            ) from exc

    def write(self, entries: Iterable[tuple[str, str, str]], *, run_id: str) -> int:
        """Append the entries not yet written in this run; return how many were new."""
        from deltalake import write_deltalake

        now = dt.datetime.now(dt.UTC)
        rows: list[dict[str, Any]] = []
        for kind, key, original in entries:
            if (kind, key) in self._seen:
                continue
            self._seen.add((kind, key))
            rows.append(
                {
                    "kind": kind,
                    "key": key,
                    "original": original,
                    "run_id": run_id,
                    "recorded_at": now,
                }
            )
        if rows:
            table = pa.Table.from_pylist(rows, schema=KEY_MAP_SCHEMA)
            write_deltalake(self._table, table, mode="append")
            self._table.update_incremental()
        return len(rows)


def read_key_map(
    url: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """The key map as pandas: one row per ``(kind, key)`` with its ``original`` value.

    Examples
    --------
    >>> keys = read_key_map("/secure/keymap")                   # doctest: +SKIP
    >>> keys[keys.kind == "patient"].set_index("key").original  # doctest: +SKIP
    """
    from deltalake import DeltaTable

    table = DeltaTable(os.fspath(url), storage_options=_delta_options(storage_options))
    frame: pd.DataFrame = table.to_pandas(columns=["kind", "key", "original", "run_id"])
    return frame.drop_duplicates(["kind", "key"], keep="first").reset_index(drop=True)
