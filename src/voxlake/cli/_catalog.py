"""``voxlake catalog ...``: show, query, history, labels, splits and maintenance."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from voxlake.cli._app import catalog_app, console, out, write_reference

if TYPE_CHECKING:
    from collections.abc import Collection


#: What ``--format`` takes, and how csv / json cells are written (in the options' help).
FORMATS = ("table", "csv", "json")
FORMAT_HELP = (
    "table, csv or json. csv and json go to stdout as they are: lists and structs as"
    " JSON, BLOBs as hexadecimal, timestamps in ISO 8601 with every digit, dates as"
    " YYYY-MM-DD."
)


def print_frame(
    frame: Any, fmt: str, *, no_wrap: Collection[str] = (), caption: str | None = None
) -> None:
    """Print a query result: a table for people, or CSV / JSON for programs.

    CSV and JSON are written to stdout as they are: through rich they were wrapped at the
    console's width (80 columns when piped), their brackets read as markup, and a large
    result took minutes of highlighting. Table cells are plain text, never markup, and
    never cut short: a narrow terminal folds them (``no_wrap`` columns, such as ids,
    keep one line while the others can give way). Missing values print blank.
    """
    if fmt == "csv":
        _write(_plain_cells(frame).to_csv(index=False))
    elif fmt == "json":
        _write(_json_records(frame) + "\n")
    else:
        table = Table(show_lines=False, caption=caption)
        for column in frame.columns:
            table.add_column(Text(str(column)), overflow="fold", no_wrap=column in no_wrap)
        for row in _plain_cells(frame).itertuples(index=False):
            table.add_row(*(Text("" if _missing(v) else str(v)) for v in row))
        out.print(table)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not table, csv or json", param_hint="--format")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _missing(value: Any) -> bool:
    import pandas as pd

    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _sql_types(frame: Any) -> dict[str, str]:
    types = frame.attrs.get("sql_types") if hasattr(frame, "attrs") else None
    return dict(types) if isinstance(types, dict) else {}


def _plain_cells(frame: Any) -> Any:
    """Cells as CSV and the table print them: list and struct cells (DuckDB hands them
    over as numpy arrays and dicts) as JSON, not numpy's repr (``["ORIGINAL",
    "PRIMARY"]``), BLOBs as hexadecimal, not ``bytearray(b'...')``, DATE columns as
    ``YYYY-MM-DD``."""
    import numpy as np
    from pandas.api.types import is_object_dtype

    def cell(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, list | dict):
            return json.dumps(_json_value(value))
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value).hex()
        return value

    types = _sql_types(frame)
    frame = frame.copy()
    for column in frame.columns:
        if types.get(str(column)) == "DATE":
            frame[column] = frame[column].map(lambda v: None if _missing(v) else _date(v))
        elif is_object_dtype(frame[column]):
            frame[column] = frame[column].map(cell)
    return frame


def _date(value: Any) -> str:
    return str(value.date().isoformat() if hasattr(value, "date") else value)


def _json_records(frame: Any) -> str:
    """``frame`` as a JSON array of objects: exact integers, ISO timestamps with every
    digit, DATE columns as ``YYYY-MM-DD``, BLOBs as hexadecimal, missing values null
    (``DataFrame.to_json`` wrote ``\\/``, milliseconds, dates as timestamps and 128-bit
    integers as floats)."""
    types = _sql_types(frame)
    columns = [str(c) for c in frame.columns]
    values = [
        _json_column(frame.iloc[:, i], types.get(column, "")) for i, column in enumerate(columns)
    ]
    records = [dict(zip(columns, row, strict=True)) for row in zip(*values, strict=True)]
    return json.dumps(records, separators=(",", ":"))


def _json_column(column: Any, kind: str) -> list[Any]:
    """One column's cells as JSON values, converted a column at a time where its dtype
    says what they all are (a 20 MB result took seconds cell by cell)."""
    import math

    import numpy as np
    import pandas as pd

    dtype = column.dtype
    if kind == "DATE":
        return [None if _missing(v) else _date(v) for v in column]
    if isinstance(dtype, np.dtype) and dtype.kind in "iub":
        return list(column.tolist())
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        exact = _is_integer_type(kind)  # DuckDB hands nullable integers over as floats
        return [
            (int(v) if exact and v.is_integer() else v) if math.isfinite(v) else None
            for v in column.tolist()
        ]
    if isinstance(dtype, pd.Int64Dtype | pd.BooleanDtype):
        return [None if v is pd.NA else v for v in column.tolist()]
    if isinstance(dtype, pd.DatetimeTZDtype) or (isinstance(dtype, np.dtype) and dtype.kind == "M"):
        return [None if v is pd.NaT else v.isoformat() for v in column]
    return [v if type(v) is str else _json_value(v) for v in column]


_INTEGER_TYPES = frozenset(
    f"{sign}{name}"
    for sign in ("", "U")
    for name in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT")
)


def _is_integer_type(kind: str) -> bool:
    return kind in _INTEGER_TYPES


#: Types whose values are JSON values as they are (``float`` too, when finite).
_PLAIN = (str, int, bool)


def _json_value(value: Any) -> Any:
    """A cell as a JSON value (numpy scalars, arrays, timestamps, bytes included)."""
    import datetime as dt
    import decimal
    import math

    import numpy as np
    import pandas as pd

    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        if all(type(v) in _PLAIN or (type(v) is float and math.isfinite(v)) for v in value):
            return list(value)  # the common case: numbers or strings, as they are
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if _missing(value):
        return None
    if isinstance(value, np.generic):
        if isinstance(value, np.datetime64 | np.timedelta64):
            value = pd.Timestamp(value) if isinstance(value, np.datetime64) else pd.Timedelta(value)
        else:
            value = value.item()
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.datetime | dt.date | dt.time | pd.Timedelta):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return pd.Timedelta(value).isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return str(value)


@catalog_app.command("show")
def catalog_show(
    url: Annotated[str, typer.Argument(help="Catalog root.")],
    version: Annotated[Optional[int], typer.Option(help="Catalog version to read.")] = None,  # noqa: UP045
) -> None:
    """Summarise a catalog: counts, modalities, failures and warnings by code, recent runs.

    Example: `voxlake catalog show out/catalog`
    """
    from voxlake.catalog import open_catalog

    cat = open_catalog(url, version=version)
    info = cat.summary()
    table = Table(title=f"catalog {url} (version {cat.version})", show_header=False)
    for key in ("instances", "volumes", "failures", "runs", "volume_bytes"):
        table.add_row(key, str(info[key]))
    for modality, count in info["volumes_by_modality"].items():
        table.add_row(Text(f"  volumes {modality}"), str(count))
    for code, count in info["failures_by_code"].items():
        table.add_row(f"  failure {code}", str(count))
    for code, count in info["warnings_by_code"].items():
        table.add_row(f"  files with warning {code}", str(count))
    out.print(table)


@catalog_app.command("query")
def catalog_query(
    url: Annotated[str, typer.Argument(help="Catalog root.")],
    sql: Annotated[
        str,
        typer.Argument(help="DuckDB SQL over instances, volumes, failures, runs, labels, splits."),
    ],
    version: Annotated[Optional[int], typer.Option(help="Catalog version to read.")] = None,  # noqa: UP045
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "table",
) -> None:
    """Run SQL against the catalog.

    Example:
    `voxlake catalog query out/catalog "SELECT modality, count(*) AS n FROM volumes GROUP BY 1"`
    """
    from voxlake.catalog import open_catalog

    _check_format(fmt)
    if not _has_statement(sql):
        raise typer.BadParameter("no SQL statement (empty, or only comments)", param_hint="'SQL'")
    print_frame(open_catalog(url, version=version).sql(sql), fmt)


def _has_statement(sql: str) -> bool:
    """Whether ``sql`` holds a statement; SQL DuckDB cannot parse counts (the query then
    reports the parse error)."""
    import duckdb

    try:
        return bool(duckdb.extract_statements(sql))
    except duckdb.Error:
        return True


@catalog_app.command("history")
def catalog_history(
    url: Annotated[str, typer.Argument(help="Catalog root.")],
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "table",
) -> None:
    """List catalog versions with the run and operation that made each.

    `status` is the ingest run's (blank for labels, splits, optimize). Versions whose
    files a vacuum removed (no longer readable) are starred in the table and have
    `vacuumed` true in csv and json.

    Example: `voxlake catalog history out/catalog`
    """
    from voxlake.catalog import open_catalog

    _check_format(fmt)
    frame = open_catalog(url).history()
    frame = frame[["version", "committed_at", "run_id", "operation", "status", "vacuumed"]]
    if fmt != "table":
        print_frame(frame, fmt)
        return
    # Fits 80 columns with run ids whole: seconds are enough to read (versions order the
    # commits; csv and json keep every digit), and vacuumed versions are starred.
    caption = (
        "* vacuumed: a vacuum removed files of these versions, they cannot be read"
        if frame["vacuumed"].any()
        else None
    )
    frame = frame.drop(columns="vacuumed").assign(
        version=[f"{v}{'*' if gone else ''}" for v, gone in zip(
            frame["version"], frame["vacuumed"], strict=True)],
        committed_at=frame["committed_at"].dt.strftime("%Y-%m-%d %H:%M:%S"),
    )  # fmt: skip
    print_frame(frame, fmt, no_wrap=("version", "run_id", "status"), caption=caption)


@catalog_app.command("attach-labels")
def catalog_attach_labels(
    url: Annotated[str, typer.Argument(help="Catalog root.")],
    labels_csv: Annotated[Path, typer.Argument(help="CSV keyed by an original identifier.")],
    on: Annotated[
        str,
        typer.Option(help="PatientID, AccessionNumber, StudyInstanceUID or SeriesInstanceUID."),
    ] = "SeriesInstanceUID",
    secret: Annotated[
        Optional[str], typer.Option(help="Secret used at ingest (default: $VOXLAKE_SECRET).")  # noqa: UP045
    ] = None,
) -> None:
    """Attach labels keyed by original identifiers (hashed at attach time).

    Example: `voxlake catalog attach-labels out/catalog data/sample/labels.csv`
    """
    from voxlake.catalog import attach_labels
    from voxlake.catalog.labels import match_labels
    from voxlake.config import resolve_secret

    key = resolve_secret(secret)
    version = attach_labels(url, labels_csv, secret=key, on=on)
    matches = match_labels(url, labels_csv, secret=key, on=on, version=version)
    out.print(
        f"labels attached: {matches.matched} keys matched volumes,"
        f" {matches.unmatched} matched none; catalog version {version}"
    )
    if matches.unmatched and not matches.matched:
        console.print(
            f"hint: no {on} in the CSV matches a volume: is the secret the one used at"
            " ingest, and --on the CSV's identifier column? (labels wait for data"
            " ingested later)",
            soft_wrap=True,
        )


@catalog_app.command("schema-doc")
def catalog_schema_doc(
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the Markdown.")] = Path(
        "docs/catalog-schema.md"
    ),
) -> None:
    """Regenerate the catalog schema reference from catalog/schema.py.

    Example: `voxlake catalog schema-doc --out docs/catalog-schema.md`
    """
    from voxlake.catalog import render_schema_markdown

    write_reference(out_file, render_schema_markdown())


@catalog_app.command("split")
def catalog_split(
    url: Annotated[str, typer.Argument(help="Catalog root.")],
    by: Annotated[
        str, typer.Option(help="patient_key, study_key, series_key or volume_id.")
    ] = "patient_key",
    seed: Annotated[int, typer.Option(help="Hash seed (fixed for the life of the split).")] = 0,
    fractions: Annotated[
        tuple[float, float, float], typer.Option(help="Train, validation and test shares.")
    ] = (0.7, 0.15, 0.15),
    name: Annotated[str, typer.Option(help="Name of the assignment.")] = "default",
) -> None:
    """Save a train / validation / test split in the catalog; saved keys never move.

    Run it again after each ingest: only new keys are added.
    Example: `voxlake catalog split out/catalog --by patient_key --seed 0`
    """
    from voxlake.catalog import save_split

    saved = save_split(url, by=by, fractions=fractions, seed=seed, name=name)
    counts = ", ".join(f"{k} {v}" for k, v in saved.counts().items())
    out.print(
        f"split {saved.name!r} by {saved.by}: {counts} ({saved.added} new keys);"
        f" catalog version {saved.catalog_version}"
    )


@catalog_app.command("optimize")
def catalog_optimize(
    url: Annotated[str, typer.Argument(help="Catalog root.")],
    cluster: Annotated[
        bool,
        typer.Option(
            help="Z-order instances and volumes by series_key (full rewrite), else compact."
        ),
    ] = True,
) -> None:
    """Compact small files and checkpoint every table (rows unchanged).

    Example: `voxlake catalog optimize out/catalog`
    """
    from voxlake.catalog import optimize_catalog

    with console.status("compacting..."):
        report = optimize_catalog(url, cluster=cluster)
    table = Table(title=f"optimized (catalog version {report.catalog_version})")
    for column in ("table", "files before", "files after"):
        table.add_column(column)
    for name, before in report.files_before.items():
        table.add_row(name, str(before), str(report.files_after[name]))
    out.print(table)


@catalog_app.command("vacuum")
def catalog_vacuum(
    url: Annotated[str, typer.Argument(help="Catalog root.")],
    store: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Volume store root: also remove orphan revisions and staging."),
    ] = None,
    retention_hours: Annotated[
        float,
        typer.Option(
            help="Versions newer than this stay readable; younger store groups are kept."
            " Below 168 (Delta's default) Delta's safety check is off: no ingest may run."
        ),
    ] = 168.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List, delete nothing.")] = False,
) -> None:
    """Remove table files and volume revisions no catalog version within the retention needs.

    Example: `voxlake catalog vacuum out/catalog --store out/volumes.zarr --dry-run`
    """
    from voxlake.catalog import vacuum_catalog

    report = vacuum_catalog(url, store=store, retention_hours=retention_hours, dry_run=dry_run)
    verb = "would remove" if report.dry_run else "removed"
    files = sum(len(v) for v in report.table_files.values())
    out.print(
        f"{verb} {files} table files, {len(report.orphan_groups)} orphan volume revisions,"
        f" {len(report.staging)} staging leftovers; versions from {report.oldest_kept_version}"
        " stay readable"
    )
    for path in report.orphan_groups:
        out.print(Text(f"  {verb}: {path}"))
