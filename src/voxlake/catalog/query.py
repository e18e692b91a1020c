"""Reading the catalog: pinned snapshots as pandas, pyarrow datasets and DuckDB SQL.

``open_catalog(url)`` pins the latest catalog version; ``version=N`` or ``as_of=datetime``
pins an older one. Every accessor of the returned :class:`Catalog` reads that snapshot, so
a notebook or a training run that records ``catalog.version`` can read exactly the same
rows again later.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import threading
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from voxlake.catalog._io import fsspec_options, read_parquet_file
from voxlake.catalog.tables import TABLES, _delta_options, data_files, table_url
from voxlake.errors import CatalogError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    import pandas as pd
    import pyarrow.dataset as pads

    from voxlake.catalog.engines import Engine

__all__ = ["Catalog", "open_catalog"]


class Catalog:
    """A read-only, version-pinned view of a voxlake catalog.

    Use :func:`open_catalog` to create one. A pinned snapshot never changes, so the
    ``DeltaTable`` objects, pyarrow datasets and the DuckDB connection it opens are kept
    and reused: repeated queries pay only for the scan.

    Attributes
    ----------
    url
        Catalog root.
    version
        The pinned catalog version (0 for an empty catalog).
    table_versions
        Delta version of each table at this catalog version; None for a table that did
        not exist yet (it reads as empty).
    committed_at
        When the pinned version was committed (UTC).
    """

    def __init__(
        self,
        url: str,
        *,
        version: int,
        table_versions: Mapping[str, int | None],
        committed_at: dt.datetime | None,
        storage_options: dict[str, str] | None,
        commits: pd.DataFrame | None = None,
    ) -> None:
        self.url = url
        self.version = version
        self.table_versions = dict(table_versions)
        self.committed_at = committed_at
        self.storage_options = storage_options
        self._commits = commits
        self._delta: dict[str, Any] = {}
        self._datasets: dict[str, pads.Dataset] = {}
        self._duckdb: dict[str, Any] = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Catalog({self.url!r}, version={self.version})"

    # -- raw access -----------------------------------------------------------------
    def delta_table(self, name: str) -> Any:
        """The ``deltalake.DeltaTable`` of ``name`` at the pinned version."""
        from deltalake import DeltaTable

        if name not in self.table_versions:
            raise CatalogError(f"unknown catalog table {name!r}; known: {list(TABLES)}")
        version = self.table_versions[name]
        if version is None:
            raise CatalogError(
                f"table {name!r} did not exist at catalog version {self.version}",
                code="no_such_table",
            )
        with self._lock:
            if name not in self._delta:
                self._delta[name] = DeltaTable(
                    table_url(self.url, name), version=version, storage_options=self.storage_options
                )
            return self._delta[name]

    def dataset(self, name: str) -> pads.Dataset:
        """A pyarrow dataset of ``name``: filters and projections push down to Parquet.

        Row groups whose statistics exclude the filter are skipped, and only the projected
        columns are read. Example:
        ``cat.dataset("volumes").to_table(filter=pc.field("modality") == "CT")``.
        """
        cached = self._datasets.get(name)
        if cached is not None:
            return cached
        if name in self.table_versions and self.table_versions[name] is None:
            import pyarrow.dataset as pads

            from voxlake.catalog.schema import SCHEMAS

            dataset: pads.Dataset = pads.dataset(SCHEMAS[name].empty_table())
        else:
            dataset = self.delta_table(name).to_pyarrow_dataset()
        self._datasets[name] = dataset
        return dataset

    def read(
        self, name: str, *, columns: list[str] | None = None, filter: Any = None
    ) -> pd.DataFrame:
        """Read table ``name`` into pandas, with optional column projection and filter."""
        with self._reading():
            frame: pd.DataFrame = (
                self.dataset(name).to_table(columns=columns, filter=filter).to_pandas()
            )
        return frame

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Say so when an old pinned version's data files were removed by ``vacuum``
        (Delta and DuckDB said only that some file was not found)."""
        try:
            yield
        except Exception as exc:
            latest = len(self._commits) if self._commits is not None else self.version
            if self.version >= latest or not _missing_file(exc):
                raise
            raise CatalogError(
                f"the files of catalog version {self.version} were removed by a vacuum",
                code="version_vacuumed",
                hint="a vacuum keeps the versions committed within its retention readable: "
                f"pin one of those or the latest ({latest}); `voxlake catalog history` "
                "lists them",
            ) from exc

    # -- convenience frames ---------------------------------------------------------
    @functools.cached_property
    def instances(self) -> pd.DataFrame:
        """All instance rows (pandas)."""
        return self.read("instances")

    @functools.cached_property
    def volumes(self) -> pd.DataFrame:
        """All volume rows (pandas)."""
        return self.read("volumes")

    @functools.cached_property
    def failures(self) -> pd.DataFrame:
        """All failure rows (pandas)."""
        return self.read("failures")

    @functools.cached_property
    def runs(self) -> pd.DataFrame:
        """All ingest runs (pandas), oldest first."""
        return self.read("runs").sort_values("started_at", ignore_index=True)

    @functools.cached_property
    def labels(self) -> pd.DataFrame:
        """All label rows (pandas)."""
        return self.read("labels")

    @functools.cached_property
    def splits(self) -> pd.DataFrame:
        """All persisted split assignments (pandas)."""
        return self.read("splits")

    def to_dask(self, name: str, *, columns: list[str] | None = None) -> Any:
        """A ``dask.dataframe`` with one partition per Parquet file (beyond-memory tables)."""
        import dask.dataframe as dd

        from voxlake.catalog.schema import SCHEMAS

        schema = SCHEMAS[name]
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        meta = schema.empty_table().to_pandas()
        if self.table_versions.get(name, 0) is None:
            return dd.from_pandas(meta, npartitions=1)
        files = data_files(self.delta_table(name), table_url(self.url, name))
        if not files:
            return dd.from_pandas(meta, npartitions=1)
        return dd.from_map(
            read_parquet_file,
            files,
            schema=schema,
            storage_options=fsspec_options(self.storage_options),
            meta=meta,
            enforce_metadata=False,
        )

    # -- SQL -------------------------------------------------------------------------
    def sql(self, query: str, *, engine: Engine = "auto") -> pd.DataFrame:
        """Run DuckDB SQL with every table registered as a view; return pandas.

        ``WHERE`` filters and column projections push down to the Parquet files of the
        pinned versions. ``engine="parquet"`` reads them with DuckDB's Parquet reader (the
        fastest on a local catalog, from lookups to full scans); ``engine="arrow"`` scans
        pyarrow datasets built from the Delta log (remote catalogs through delta-rs);
        ``"auto"`` (default) picks ``"parquet"`` for a local catalog and ``"arrow"`` for a
        remote one (see :mod:`voxlake.catalog.engines`). Connections and parsed Parquet
        footers are kept per :class:`Catalog` and engine, so repeated queries pay only for
        the scan (queries on one catalog run one at a time).

        128-bit integers (``sum()`` of an integer column is a ``HUGEINT``) come back as
        integers, not floats; ``frame.attrs["sql_types"]`` maps each column to its DuckDB
        type (``DATE``, ``BLOB``...).
        """
        import duckdb

        from voxlake.catalog._frames import result_frame
        from voxlake.catalog.engines import duckdb_connection, resolve_engine

        engine = resolve_engine(self, engine)
        with self._lock, self._reading():
            if engine not in self._duckdb:
                self._duckdb[engine] = duckdb_connection(self, engine)
            try:
                frame = result_frame(self._duckdb[engine].execute(query))
            except duckdb.Error as exc:
                raise CatalogError(f"SQL failed: {exc}", code="bad_sql") from exc
        return frame

    def close(self) -> None:
        """Close the DuckDB connections (datasets stay usable)."""
        with self._lock:
            for con in self._duckdb.values():
                con.close()
            self._duckdb.clear()

    # -- history ---------------------------------------------------------------------
    def history(self) -> pd.DataFrame:
        """One row per catalog version up to the pinned one, with its run's status.

        Commits that are not part of an ingest run (labels, splits, optimize) have no
        run: their ``status`` and run counts are null. ``vacuumed`` is True where a
        vacuum removed files the version reads (reading it raises ``version_vacuumed``);
        finding out lists the folder of each table a vacuum removed files from and reads
        the Delta log of each of its versions (tables never vacuumed are not read).
        """
        from voxlake.catalog._history import catalog_history

        commits = (
            self._commits if self._commits is not None else _commits(self.url, self.storage_options)
        )
        return catalog_history(self, commits)

    # -- training helpers ------------------------------------------------------------
    def training_selection(self, label: str = "label", *, split: str | None = None) -> pd.DataFrame:
        """Volumes joined with their label ``label``, optionally with a persisted split.

        A volume takes its series label, else its study label (attached by
        StudyInstanceUID, else by AccessionNumber), else its patient label; volumes
        without a label are dropped. Raw identifiers never appear: labels are stored
        under keyed hashes (see :func:`voxlake.catalog.attach_labels`).

        Parameters
        ----------
        label
            Label name.
        split
            Name of a split saved with :func:`voxlake.catalog.save_split`: adds a
            ``split`` column (train / validation / test). Volumes whose key was added
            after the split was saved get the split the same hash assigns them.

        Returns
        -------
        pandas.DataFrame
            Volume rows plus ``label`` (and ``split``); ``attrs["catalog_version"]``
            records the version read, ``attrs["split"]`` the split name.
        """
        from voxlake.catalog.labels import label_volumes

        selected = label_volumes(self, label)
        if split is not None:
            from voxlake.catalog.splits import apply_saved_split

            selected = apply_saved_split(self, selected, name=split)
            selected.attrs["split"] = split
        selected.attrs["catalog_version"] = self.version
        return selected

    def split(
        self,
        by: str = "patient_key",
        *,
        fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        name: str = "default",
    ) -> pd.DataFrame:
        """Assign train / validation / test to every distinct ``by`` value of the volumes.

        Keys already saved under ``name`` keep their persisted split; new keys are
        assigned by hashing (:func:`voxlake.splits.assign_split`). Nothing is written:
        :func:`voxlake.catalog.save_split` persists the result.

        Returns
        -------
        pandas.DataFrame
            Columns ``key`` and ``split``, one row per distinct key, plus ``saved``
            (True where the split comes from the ``splits`` table).
        """
        from voxlake.catalog.splits import compute_split

        return compute_split(self, by=by, fractions=fractions, seed=seed, name=name)

    # -- display ---------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Counts per table, volumes per modality, failures per code and files per warning
        code."""
        volumes = self.read("volumes", columns=["modality", "nbytes"])
        failures = self.read("failures", columns=["code"])
        with self._reading():
            rows = {
                name: self.dataset(name).count_rows() for name in ("instances", "runs", "labels")
            }
            warned = self._warnings_by_code()
        return {
            "url": self.url,
            "version": self.version,
            "committed_at": self.committed_at,
            "instances": rows["instances"],
            "volumes": len(volumes),
            "failures": len(failures),
            "runs": rows["runs"],
            "labels": rows["labels"],
            "volume_bytes": int(volumes["nbytes"].sum()) if len(volumes) else 0,
            "volumes_by_modality": volumes["modality"].value_counts().to_dict(),
            "failures_by_code": failures["code"].value_counts().to_dict(),
            "warnings_by_code": warned,
        }

    def _warnings_by_code(self) -> dict[str, int]:
        """Warning code to the number of files (``instances.warnings``) carrying it, most
        frequent first; empty for a catalog written before warnings were recorded."""
        import pyarrow.compute as pc

        instances = self.dataset("instances")
        if "warnings" not in instances.schema.names:
            return {}
        codes = pc.list_flatten(instances.to_table(columns=["warnings"]).column("warnings"))
        counts = pc.value_counts(codes).to_pylist()
        ranked = sorted(counts, key=lambda c: (-c["counts"], c["values"]))
        return {c["values"]: c["counts"] for c in ranked}

    def _repr_html_(self) -> str:
        from voxlake.catalog._display import summary_html

        return summary_html(self)


def _commits(url: str, storage_options: dict[str, str] | None) -> pd.DataFrame:
    from deltalake import DeltaTable

    uri = table_url(url, "_commits")
    try:
        table = DeltaTable(uri, storage_options=storage_options)
    except Exception as exc:
        raise CatalogError(
            f"no voxlake catalog at {url}",
            code="catalog_not_found",
            hint="run `voxlake ingest ... --catalog URL` first, or check the URL",
        ) from exc
    frame = table.to_pandas().sort_values("committed_at", ignore_index=True)
    return frame


def open_catalog(
    url: str | os.PathLike[str],
    *,
    version: int | None = None,
    as_of: dt.datetime | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Catalog:
    """Open a catalog pinned to a version.

    Parameters
    ----------
    url
        Catalog root (local path or ``s3://...``).
    version
        Catalog version (1 = the first commit). Default: the latest.
    as_of
        Pin the latest version committed at or before this time (timezone-aware; naive
        datetimes are taken as UTC).
    storage_options
        delta-rs storage options for remote catalogs.

    Examples
    --------
    >>> cat = open_catalog("catalog")                         # doctest: +SKIP
    >>> cat.sql("SELECT modality, count(*) FROM volumes GROUP BY 1")  # doctest: +SKIP
    """
    root = os.fspath(url).rstrip("/")
    options = _delta_options(storage_options)
    commits = _commits(root, options)
    if version is not None and as_of is not None:
        raise CatalogError("give version or as_of, not both", code="config")
    if commits.empty:
        if version not in (None, 0):
            raise CatalogError(f"catalog has no version {version}", code="no_such_version")
        return Catalog(
            root,
            version=0,
            table_versions=dict.fromkeys(TABLES),
            committed_at=None,
            storage_options=options,
            commits=commits,
        )
    if as_of is not None:
        moment = as_of if as_of.tzinfo else as_of.replace(tzinfo=dt.UTC)
        eligible = commits[commits["committed_at"] <= moment]
        if eligible.empty:
            raise CatalogError(
                "catalog has no version at or before that time", code="no_such_version"
            )
        position = int(eligible.index[-1])
    elif version is None:
        position = len(commits) - 1
    else:
        if not 1 <= version <= len(commits):
            raise CatalogError(
                f"catalog has versions 1..{len(commits)}, not {version}", code="no_such_version"
            )
        position = version - 1
    row = commits.iloc[position]
    return Catalog(
        root,
        version=position + 1,
        table_versions={name: _table_version(row, name) for name in TABLES},
        committed_at=row["committed_at"].to_pydatetime(),
        storage_options=options,
        commits=commits,
    )


def _missing_file(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says a file was not found."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, FileNotFoundError) or "No files found that match" in text:
            return True
        if "Object at location" in text and "not found" in text:  # delta-rs's object store
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _table_version(row: pd.Series, name: str) -> int | None:
    """A table's version in a ``_commits`` row; None where the table did not exist yet."""
    import pandas as pd

    value = row.get(f"{name}_version")
    return None if value is None or pd.isna(value) else int(value)
