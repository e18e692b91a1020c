"""Attach labels keyed by original identifiers, storing only keyed hashes.

Hospitals hand over labels keyed by PatientID, AccessionNumber, StudyInstanceUID or
SeriesInstanceUID. :func:`attach_labels` hashes those identifiers with the same secret
the ingest used, at attach time, so the raw identifiers never land in the catalog.

Labels join volumes by key kind: ``series`` on ``series_key``, ``study`` on ``study_key``,
``accession`` through the instances' ``accession_key`` to their ``study_key`` (an
accession number names the order a study was made for), ``patient`` on ``patient_key``.
Labels may be attached before the data they describe is ingested: the keys join up when
it arrives; :func:`match_labels` counts the keys that match a volume now.

One identifier with two different values of a label is refused (which is right is not
ours to guess); exact duplicate rows are kept once.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voxlake.catalog.tables import CatalogWriter
from voxlake.errors import CatalogError, ConfigError, SourceError
from voxlake.keys import keyed_hash

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import pandas as pd

    from voxlake.catalog.query import Catalog

__all__ = ["IDENTIFIER_KINDS", "LabelMatches", "attach_labels", "label_volumes", "match_labels"]

#: Identifier column -> key kind it is hashed as (:func:`voxlake.keys.keyed_hash`).
IDENTIFIER_KINDS: dict[str, str] = {
    "PatientID": "patient",
    "AccessionNumber": "accession",
    "StudyInstanceUID": "study",
    "SeriesInstanceUID": "series",
}

#: Label precedence for a volume, weakest first: a later kind overrides an earlier one.
_PRECEDENCE = ("patient", "accession", "study", "series")


@dataclass(frozen=True)
class LabelMatches:
    """How many distinct identifiers of a label table match volumes of a catalog."""

    matched: int
    unmatched: int


@dataclass(frozen=True)
class _LabelRows:
    kind: str
    columns: list[str]
    #: One row per (key, label name): duplicates dropped, conflicts refused.
    rows: list[tuple[str, str, float]]


def _read_table(labels: pd.DataFrame | str | os.PathLike[str], on: str) -> pd.DataFrame:
    import pandas as pd

    if isinstance(labels, pd.DataFrame):
        return labels
    path = os.fspath(labels)
    try:
        return pd.read_csv(path, dtype={on: str})
    except FileNotFoundError as exc:
        raise SourceError(
            f"label file not found: {path}",
            code="labels_not_found",
            hint="give the path of a CSV with an identifier column and numeric label columns",
        ) from exc
    except pd.errors.EmptyDataError as exc:
        raise ConfigError(f"label file is empty: {path}", code="empty_labels") from exc
    except OSError as exc:
        raise SourceError(f"cannot read label file {path}: {exc.strerror or exc}") from exc


def _label_rows(
    labels: pd.DataFrame | str | os.PathLike[str],
    *,
    secret: str,
    on: str,
    columns: Sequence[str] | None,
) -> _LabelRows:
    """The (key, name, value) rows of a label table; see :func:`attach_labels`."""
    import pandas as pd

    if on not in IDENTIFIER_KINDS:
        raise ConfigError(
            f"labels can be keyed by {', '.join(IDENTIFIER_KINDS)}, not {on!r}",
            hint="pass on='SeriesInstanceUID' (or PatientID / AccessionNumber / StudyInstanceUID)",
        )
    frame = _read_table(labels, on)
    if on not in frame.columns:
        raise ConfigError(f"label table has no column {on!r}")
    identifier_columns = set(IDENTIFIER_KINDS)
    if columns is None:
        columns = [
            c
            for c in frame.columns
            if c not in identifier_columns and pd.api.types.is_numeric_dtype(frame[c])
        ]
    if not columns:
        raise ConfigError("label table has no numeric label column")
    kind = IDENTIFIER_KINDS[on]
    values: dict[tuple[str, str], float] = {}
    written: dict[str, str] = {}  # key -> the identifier as the table first writes it
    conflicts: dict[str, set[str]] = {}  # key -> label names with two values
    for identifier, *row in frame[[on, *columns]].itertuples(index=False):
        if pd.isna(identifier) or not str(identifier).strip():
            continue
        key = keyed_hash(secret, kind, str(identifier))
        written.setdefault(key, str(identifier))
        for name, value in zip(columns, row, strict=True):
            if pd.isna(value):
                continue
            number = float(value)
            if values.setdefault((key, name), number) != number:
                conflicts.setdefault(key, set()).add(name)
    if conflicts:
        names = [c for c in columns if any(c in found for found in conflicts.values())]
        example = written[next(iter(conflicts))]
        raise ConfigError(
            f"{len(conflicts)} {on} value(s) have rows with different values of"
            f" {', '.join(names)} (e.g. {on} {example!r})",
            code="conflicting_labels",
            hint="keep one value per identifier and label (exact duplicate rows are fine)",
            conflicting_keys=len(conflicts),
        )
    rows = [(key, name, value) for (key, name), value in values.items()]
    return _LabelRows(kind, list(columns), rows)


def attach_labels(
    catalog_url: str | os.PathLike[str],
    labels: pd.DataFrame | str | os.PathLike[str],
    *,
    secret: str,
    on: str = "SeriesInstanceUID",
    columns: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    run_id: str = "labels",
) -> int | None:
    """Attach label columns to the catalog; return the new catalog version.

    Parameters
    ----------
    catalog_url
        Catalog root.
    labels
        A DataFrame or a CSV path with an identifier column ``on`` and label columns.
    secret
        The de-identification secret used at ingest (keys must match).
    on
        Identifier column: PatientID, AccessionNumber, StudyInstanceUID or
        SeriesInstanceUID.
    columns
        Label columns to attach (numeric). Default: every other numeric column.
    storage_options
        delta-rs storage options.
    run_id
        Recorded on the catalog commit.

    Raises
    ------
    ConfigError
        ``conflicting_labels`` when one identifier has two different values of a label
        (exact duplicate rows are attached once); a bad ``on`` or no label column.
    SourceError
        ``labels_not_found`` when the CSV does not exist.
    """
    import pandas as pd

    table = _label_rows(labels, secret=secret, on=on, columns=columns)
    source = os.path.basename(os.fspath(labels)) if not isinstance(labels, pd.DataFrame) else ""
    now = dt.datetime.now(dt.UTC)
    rows: list[dict[str, Any]] = [
        {
            "key_kind": table.kind,
            "key": key,
            "name": name,
            "value": value,
            "source": source,
            "attached_at": now,
        }
        for key, name, value in table.rows
    ]
    writer = CatalogWriter(catalog_url, storage_options=storage_options)
    return writer.commit({"labels": rows}, run_id=run_id, operation="attach_labels")


def match_labels(
    catalog_url: str | os.PathLike[str],
    labels: pd.DataFrame | str | os.PathLike[str],
    *,
    secret: str,
    on: str = "SeriesInstanceUID",
    columns: Sequence[str] | None = None,
    version: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> LabelMatches:
    """Count the distinct identifiers of a label table that match volumes of a catalog.

    Takes the arguments of :func:`attach_labels` (and refuses the same tables); an
    identifier matches when a volume has its key (``accession``: through the instances
    to a study with a volume). None matching usually means another secret or ``on``.
    """
    from voxlake.catalog.engines import isin
    from voxlake.catalog.query import open_catalog

    table = _label_rows(labels, secret=secret, on=on, columns=columns)
    keys = sorted({key for key, _, _ in table.rows})
    if not keys:
        return LabelMatches(0, 0)
    catalog = open_catalog(catalog_url, version=version, storage_options=storage_options)
    if table.kind == "accession":
        pairs = catalog.dataset("instances").to_table(
            columns=["accession_key", "study_key"], filter=isin("accession_key", keys)
        )
        study_of = [
            (accession, study)
            for accession, study in zip(
                pairs.column(0).to_pylist(), pairs.column(1).to_pylist(), strict=True
            )
            if study is not None
        ]
        studies = {study for _, study in study_of}
        volumes = (
            catalog.read("volumes", columns=["study_key"], filter=isin("study_key", studies))
            if studies
            else None
        )
        with_volume = set(volumes["study_key"]) if volumes is not None else set()
        found = {accession for accession, study in study_of if study in with_volume}
    else:
        column = f"{table.kind}_key"
        found = set(catalog.read("volumes", columns=[column], filter=isin(column, keys))[column])
    matched = len(found.intersection(keys))
    return LabelMatches(matched, len(keys) - matched)


def label_volumes(catalog: Catalog, label: str) -> pd.DataFrame:
    """Volumes of ``catalog`` with a ``label`` column; volumes without that label dropped.

    A volume takes its series label, else its study label (by StudyInstanceUID, else by
    AccessionNumber), else its patient label.

    Raises
    ------
    CatalogError
        ``no_such_label`` when no label ``label`` is attached at this catalog version
        (the hint lists those that are).
    """
    from voxlake.catalog.engines import isin

    labels = catalog.labels
    _check_label(catalog, label, labels)
    volumes = catalog.volumes.copy()
    labels = labels[labels["name"] == label]
    volumes[label] = float("nan")
    for kind in _PRECEDENCE:
        sub = labels[labels["key_kind"] == kind].drop_duplicates("key", keep="last")
        if sub.empty:
            continue
        mapping = dict(zip(sub["key"], sub["value"], strict=True))
        if kind == "accession":
            # accession_key -> study_key from the instances (pushdown: only these keys).
            pairs = catalog.dataset("instances").to_table(
                columns=["accession_key", "study_key"],
                filter=isin("accession_key", mapping),
            )
            study_value = {
                study: mapping[accession]
                for accession, study in zip(
                    pairs.column(0).to_pylist(), pairs.column(1).to_pylist(), strict=True
                )
                if study is not None
            }
            values = volumes["study_key"].map(study_value)
        else:
            values = volumes[f"{kind}_key"].map(mapping)
        volumes[label] = values.where(values.notna(), volumes[label])
    return volumes[volumes[label].notna()].reset_index(drop=True)


#: Label names listed in the hint of ``no_such_label`` (beyond: "and N more").
_LISTED_LABELS = 20


def _check_label(catalog: Catalog, label: str, labels: pd.DataFrame) -> None:
    names = sorted({str(n) for n in labels["name"].dropna()})
    if label in names:
        return
    if names:
        listed = ", ".join(names[:_LISTED_LABELS])
        more = f" and {len(names) - _LISTED_LABELS} more" if len(names) > _LISTED_LABELS else ""
        hint = f"labels attached: {listed}{more} (--label NAME)"
    else:
        hint = "attach labels first: voxlake catalog attach-labels URL LABELS_CSV"
    raise CatalogError(
        f"no label {label!r} in catalog version {catalog.version}",
        code="no_such_label",
        hint=hint,
        labels=len(names),
    )
