"""Attach labels keyed by original identifiers, storing only keyed hashes.

Hospitals hand over labels keyed by PatientID, AccessionNumber, StudyInstanceUID or
SeriesInstanceUID. :func:`attach_labels` hashes those identifiers with the same secret
the ingest used, at attach time, so the raw identifiers never land in the catalog.

Labels join volumes by key kind: ``series`` on ``series_key``, ``study`` on ``study_key``,
``accession`` through the instances' ``accession_key`` to their ``study_key`` (an
accession number names the order a study was made for), ``patient`` on ``patient_key``.
Labels may be attached before the data they describe is ingested: the keys join up when
it arrives.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import TYPE_CHECKING, Any

from voxlake.catalog.tables import CatalogWriter
from voxlake.errors import ConfigError
from voxlake.keys import keyed_hash

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import pandas as pd

    from voxlake.catalog.query import Catalog

__all__ = ["IDENTIFIER_KINDS", "attach_labels", "label_volumes"]

#: Identifier column -> key kind it is hashed as (:func:`voxlake.keys.keyed_hash`).
IDENTIFIER_KINDS: dict[str, str] = {
    "PatientID": "patient",
    "AccessionNumber": "accession",
    "StudyInstanceUID": "study",
    "SeriesInstanceUID": "series",
}

#: Label precedence for a volume, weakest first: a later kind overrides an earlier one.
_PRECEDENCE = ("patient", "accession", "study", "series")


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
    """
    import pandas as pd

    if on not in IDENTIFIER_KINDS:
        raise ConfigError(
            f"labels can be keyed by {', '.join(IDENTIFIER_KINDS)}, not {on!r}",
            hint="pass on='SeriesInstanceUID' (or PatientID / AccessionNumber / StudyInstanceUID)",
        )
    frame = labels if isinstance(labels, pd.DataFrame) else pd.read_csv(labels, dtype={on: str})
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
    source = os.path.basename(os.fspath(labels)) if not isinstance(labels, pd.DataFrame) else ""
    now = dt.datetime.now(dt.UTC)
    rows: list[dict[str, Any]] = []
    for identifier, *values in frame[[on, *columns]].itertuples(index=False):
        if pd.isna(identifier) or not str(identifier).strip():
            continue
        key = keyed_hash(secret, kind, str(identifier))
        for name, value in zip(columns, values, strict=True):
            if pd.isna(value):
                continue
            rows.append(
                {
                    "key_kind": kind,
                    "key": key,
                    "name": name,
                    "value": float(value),
                    "source": source,
                    "attached_at": now,
                }
            )
    writer = CatalogWriter(catalog_url, storage_options=storage_options)
    return writer.commit({"labels": rows}, run_id=run_id, operation="attach_labels")


def label_volumes(catalog: Catalog, label: str) -> pd.DataFrame:
    """Volumes of ``catalog`` with a ``label`` column; volumes without that label dropped.

    A volume takes its series label, else its study label (by StudyInstanceUID, else by
    AccessionNumber), else its patient label.
    """
    from voxlake.catalog.engines import isin

    volumes = catalog.volumes.copy()
    labels = catalog.labels
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
