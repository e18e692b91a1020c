"""Train / validation / test splits persisted in the catalog's ``splits`` table.

The assignment itself is :func:`voxlake.splits.assign_split` (one implementation, shared
with :mod:`voxlake.training.split`): a key's split is a hash of the key and the seed, so
it does not depend on which other keys exist. Persisting it adds what hashing alone cannot
promise: a key written to the ``splits`` table keeps its split forever, even the few keys
that :func:`~voxlake.splits.assign_split` moves to fill an empty split of a tiny dataset.
Saving again after new data arrives only adds rows for the new keys.

Splits group volumes by one column (``patient_key`` by default, so no patient straddles
train and test); several named assignments (``name``) can coexist.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voxlake.errors import CatalogError, ConfigError
from voxlake.splits import SPLITS, assign_split, check_fractions, format_fractions

if TYPE_CHECKING:
    from collections.abc import Mapping

    import pandas as pd

    from voxlake.catalog.query import Catalog

__all__ = [
    "SPLITS",
    "SPLIT_BY",
    "SavedSplit",
    "apply_saved_split",
    "check_split_name",
    "compute_split",
    "save_split",
]

#: Volume columns a split can group by.
SPLIT_BY: tuple[str, ...] = ("patient_key", "study_key", "series_key", "volume_id")


@dataclass(frozen=True)
class SavedSplit:
    """What :func:`save_split` did.

    Attributes
    ----------
    name, by, seed, fractions
        The assignment's parameters.
    catalog_version
        Catalog version that holds the split (the previous one if nothing was added).
    added
        Keys written by this call (0 when every key was already saved).
    assignment
        One row per distinct key of the volumes: ``key``, ``split``, ``saved`` (True where
        the split was already persisted before this call).
    """

    name: str
    by: str
    seed: int
    fractions: tuple[float, float, float]
    catalog_version: int
    added: int
    assignment: pd.DataFrame

    def counts(self) -> dict[str, int]:
        """Keys per split."""
        values = self.assignment["split"].value_counts()
        return {name: int(values.get(name, 0)) for name in SPLITS}


def _saved(catalog: Catalog, name: str) -> pd.DataFrame:
    splits = catalog.splits
    return splits[splits["name"] == name]


def _check_same(saved: pd.DataFrame, *, name: str, by: str, seed: int, fractions: Any) -> None:
    first = saved.iloc[0]
    same_fractions = len(first["fractions"]) == 3 and all(
        abs(float(a) - float(b)) < 1e-9 for a, b in zip(first["fractions"], fractions, strict=True)
    )
    if first["by"] != by or int(first["seed"]) != seed or not same_fractions:
        raise ConfigError(
            f"split {name!r} was saved with by={first['by']}, seed={int(first['seed'])},"
            f" fractions={format_fractions(first['fractions'])}; it cannot change",
            hint="choose another --name for a different assignment",
        )


def _assign(
    saved: Mapping[str, str], keys: list[str], *, fractions: Any, seed: int
) -> dict[str, str]:
    """Persisted splits where saved, else the hash assignment over saved and new keys."""
    new = sorted(set(keys) - set(saved))
    if not new:
        return {k: saved[k] for k in keys}
    universe = sorted(set(saved) | set(new))
    hashed = dict(
        zip(universe, assign_split(universe, fractions=fractions, seed=seed), strict=True)
    )
    return {k: saved.get(k, hashed[k]) for k in keys}


def compute_split(
    catalog: Catalog,
    *,
    by: str = "patient_key",
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    name: str = "default",
) -> pd.DataFrame:
    """Assign a split to every distinct ``by`` value of the catalog's volumes (no write).

    Keys already saved under ``name`` keep their split; the others are hashed. Raises
    :class:`~voxlake.errors.ConfigError` if ``name`` was saved with other parameters or
    is blank (``bad_split_name``), and :class:`~voxlake.errors.CatalogError`
    ``no_volumes`` when the catalog has no volumes.
    """
    import numpy as np
    import pandas as pd

    if by not in SPLIT_BY:
        raise ConfigError(f"cannot split by {by!r}", hint=f"use one of {', '.join(SPLIT_BY)}")
    check_split_name(name)
    fractions = check_fractions(fractions)
    column = catalog.read("volumes", columns=[by])[by]
    if column.empty:
        raise CatalogError(
            f"catalog version {catalog.version} has no volumes to split",
            code="no_volumes",
            hint="ingest some data first: voxlake ingest SOURCE --catalog URL --store URL",
        )
    keys = sorted({str(k) for k in column.dropna().tolist()})
    saved = _saved(catalog, name)
    if len(saved):
        _check_same(saved, name=name, by=by, seed=seed, fractions=fractions)
    persisted = dict(zip(saved["key"], saved["split"], strict=True))
    assigned = _assign(persisted, keys, fractions=fractions, seed=seed)
    return pd.DataFrame(
        {
            "key": keys,
            "split": [assigned[k] for k in keys],
            "saved": np.array([k in persisted for k in keys], dtype=bool),
        }
    )


def check_split_name(name: str) -> str:
    """Refuse a split name that is empty or only whitespace (``--name ""``); return it.

    Raises
    ------
    ConfigError
        ``bad_split_name``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"split name {name!r} is blank: a split is read back by its name",
            code="bad_split_name",
            hint="give a name such as 'default' (--name)",
        )
    return name


def save_split(
    catalog_url: str | os.PathLike[str],
    *,
    by: str = "patient_key",
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    name: str = "default",
    storage_options: Mapping[str, Any] | None = None,
    run_id: str = "split",
) -> SavedSplit:
    """Persist the split of every volume key in the ``splits`` table (one catalog commit).

    Keys saved before keep their split; only new keys are written, so running this again
    after every ingest extends the split without moving anyone.

    Parameters
    ----------
    catalog_url
        Catalog root.
    by
        Volume column to group by: ``patient_key`` (default), ``study_key``,
        ``series_key`` or ``volume_id``.
    fractions
        Train, validation and test shares (sum to 1).
    seed
        Hash seed; fixed for the life of ``name``.
    name
        Assignment name; ``Catalog.training_selection(label, split=name)`` reads it.
    storage_options
        delta-rs storage options.
    run_id
        Recorded on the catalog commit.

    Raises
    ------
    CatalogError
        ``no_volumes`` when the catalog has no volumes to split.
    ConfigError
        ``bad_split_name`` for a blank ``name``; a ``name`` saved before with other
        parameters; bad ``by`` or ``fractions``.

    Examples
    --------
    >>> save_split("catalog", by="patient_key", seed=0).counts()  # doctest: +SKIP
    {'train': 70, 'validation': 15, 'test': 15}
    """
    from voxlake.catalog.query import open_catalog
    from voxlake.catalog.tables import CatalogWriter

    check_split_name(name)
    fractions = check_fractions(fractions)
    writer = CatalogWriter(catalog_url, storage_options=storage_options)
    catalog = open_catalog(catalog_url, storage_options=storage_options)
    assignment = compute_split(catalog, by=by, fractions=fractions, seed=seed, name=name)
    fresh = assignment[~assignment["saved"]]
    now = dt.datetime.now(dt.UTC)
    rows = [
        {
            "name": name,
            "by": by,
            "key": key,
            "split": split,
            "seed": seed,
            "fractions": list(fractions),
            "assigned_at": now,
        }
        for key, split in zip(fresh["key"], fresh["split"], strict=True)
    ]
    version = writer.commit({"splits": rows}, run_id=run_id, operation=f"split {name}")
    return SavedSplit(
        name=name,
        by=by,
        seed=seed,
        fractions=fractions,
        catalog_version=catalog.version if version is None else version,
        added=len(rows),
        assignment=assignment,
    )


def apply_saved_split(catalog: Catalog, frame: pd.DataFrame, *, name: str) -> pd.DataFrame:
    """Return ``frame`` (volume rows) with a ``split`` column from the saved split ``name``.

    Rows whose key is not saved yet (ingested after the split was saved) get the split
    that saving again would give them.
    """
    saved = _saved(catalog, name)
    if saved.empty:
        raise CatalogError(
            f"no split named {name!r} at catalog version {catalog.version}",
            code="no_such_split",
            hint="save one with `voxlake catalog split URL` or voxlake.catalog.save_split",
        )
    first = saved.iloc[0]
    by = str(first["by"])
    if by not in frame.columns:
        raise ConfigError(f"split {name!r} groups by {by!r}, which the selection lacks")
    persisted = dict(zip(saved["key"], saved["split"], strict=True))
    keys = [str(k) for k in frame[by].tolist()]
    fractions = tuple(float(f) for f in first["fractions"])
    assigned = _assign(persisted, keys, fractions=fractions, seed=int(first["seed"]))
    out = frame.copy()
    out["split"] = [assigned[k] for k in keys]
    return out
