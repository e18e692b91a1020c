"""The catalog's history: one row per version, its run, and whether a vacuum took its files.

A version is *vacuumed* when a data file it reads is gone: reading it then fails with
``version_vacuumed`` (see ``Catalog._reading``). That is checked, not guessed from the
vacuum's retention (a version older than the retention still reads when a later one
replaced none of its files): the folder of each table a vacuum removed files from is
listed once, and the file list of every table version the catalog versions pin is
compared with it. Tables whose Delta log records no vacuum are not checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from voxlake.catalog._io import fsspec_options
from voxlake.catalog.tables import TABLES, table_url

if TYPE_CHECKING:
    import pandas as pd

    from voxlake.catalog.query import Catalog

__all__ = ["catalog_history", "vacuumed_versions"]

#: Run columns joined to the commits; counts stay integers (Int64, null where no run).
_RUN_COUNTS = ("files_seen", "volumes_written", "failures")


def catalog_history(catalog: Catalog, commits: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``commits`` up to the pinned version, with run status and ``vacuumed``."""
    commits = commits.copy()
    commits.insert(0, "version", range(1, len(commits) + 1))
    commits = commits[commits["version"] <= catalog.version]
    runs = catalog.runs[["run_id", "status", *_RUN_COUNTS]]
    frame = commits.merge(runs, on="run_id", how="left")
    for column in _RUN_COUNTS:
        frame[column] = frame[column].astype("Int64")
    gone = vacuumed_versions(catalog, commits)
    frame["vacuumed"] = frame["version"].isin(gone)
    return frame


def vacuumed_versions(catalog: Catalog, commits: pd.DataFrame) -> set[int]:
    """Catalog versions (of ``commits``, with their ``version`` column) whose files a
    vacuum removed."""
    if commits.empty:
        return set()
    from deltalake import DeltaTable

    fs_options = fsspec_options(catalog.storage_options) or {}
    gone: set[int] = set()
    for name in TABLES:
        column = f"{name}_version"
        if column not in commits.columns:
            continue
        pinned = commits[["version", column]].dropna()
        table_versions = sorted({int(v) for v in pinned[column]})
        if not table_versions:
            continue
        url = table_url(catalog.url, name)
        table = DeltaTable(url, storage_options=catalog.storage_options)
        if not _vacuumed(table):
            continue
        present = _file_names(url, fs_options)
        missing = {v for v in table_versions if not _complete(table, v, present)}
        pairs = zip(pinned["version"], pinned[column], strict=True)
        gone.update(int(version) for version, pin in pairs if int(pin) in missing)
    return gone


def _vacuumed(table: Any) -> bool:
    """Whether a vacuum ever removed files of ``table`` (delta-rs records a ``VACUUM
    START`` commit when there is something to remove)."""
    try:
        entries = table.history()
    except Exception:  # part of the log is gone: check the files
        return True
    return any(str(entry.get("operation", "")).startswith("VACUUM") for entry in entries)


def _file_names(url: str, fs_options: dict[str, Any]) -> set[str]:
    """Names of the files in a table's folder (data files lie right under it)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **fs_options)
    return {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}


def _complete(table: Any, version: int, present: set[str]) -> bool:
    """Whether every data file of ``table`` at ``version`` is still there."""
    try:
        table.load_as_version(version)
    except Exception:  # its log entries are gone too: not readable either
        return False
    return all(uri.rsplit("/", 1)[-1] in present for uri in table.file_uris())
