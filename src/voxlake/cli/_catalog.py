"""``voxlake catalog ...``: show, query, history, labels, splits and maintenance."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from voxlake.cli._app import catalog_app, console, out, write_reference


def print_frame(frame: Any, fmt: str) -> None:
    """Print a query result: a table for people, or CSV / JSON for programs.

    CSV and JSON are written to stdout as they are: through rich they were wrapped at the
    console's width (80 columns when piped), their brackets read as markup, and a large
    result took minutes of highlighting. Table cells are plain text, never markup.
    """
    if fmt == "csv":
        _write(_plain_lists(frame).to_csv(index=False))
    elif fmt == "json":
        _write(frame.to_json(orient="records", date_format="iso") + "\n")
    else:
        table = Table(show_lines=False)
        for column in frame.columns:
            table.add_column(Text(str(column)))
        for row in frame.itertuples(index=False):
            table.add_row(*(Text(str(v)) for v in row))
        out.print(table)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _plain_lists(frame: Any) -> Any:
    """List and struct cells (DuckDB hands them over as numpy arrays and dicts) as JSON,
    not as numpy's repr: ``["ORIGINAL", "PRIMARY"]``."""
    import numpy as np
    from pandas.api.types import is_object_dtype

    def cell(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, list | dict):
            return json.dumps(value, default=str)
        return value

    frame = frame.copy()
    for column in frame.columns:
        if is_object_dtype(frame[column]):
            frame[column] = frame[column].map(cell)
    return frame


@catalog_app.command("show")
def catalog_show(
    url: Annotated[str, typer.Argument(help="Catalog root.")],
    version: Annotated[Optional[int], typer.Option(help="Catalog version to read.")] = None,  # noqa: UP045
) -> None:
    """Summarise a catalog: counts, modalities, failures by code, recent runs.

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
    out.print(table)


@catalog_app.command("query")
def catalog_query(
    url: Annotated[str, typer.Argument(help="Catalog root.")],
    sql: Annotated[
        str,
        typer.Argument(help="DuckDB SQL over instances, volumes, failures, runs, labels, splits."),
    ],
    version: Annotated[Optional[int], typer.Option(help="Catalog version to read.")] = None,  # noqa: UP045
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Run SQL against the catalog.

    Example:
    `voxlake catalog query out/catalog "SELECT modality, count(*) AS n FROM volumes GROUP BY 1"`
    """
    from voxlake.catalog import open_catalog

    if fmt not in ("table", "csv", "json"):
        raise typer.BadParameter(f"{fmt!r} is not table, csv or json", param_hint="--format")
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
def catalog_history(url: Annotated[str, typer.Argument(help="Catalog root.")]) -> None:
    """List catalog versions with the run and operation that made each.

    Example: `voxlake catalog history out/catalog`
    """
    from voxlake.catalog import open_catalog

    frame = open_catalog(url).history()
    print_frame(frame[["version", "committed_at", "run_id", "operation", "status"]], "table")


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
    from voxlake.catalog import open_catalog, save_split
    from voxlake.errors import CatalogError

    cat = open_catalog(url)
    if cat.read("volumes", columns=["volume_id"]).empty:
        raise CatalogError(
            f"catalog version {cat.version} has no volumes to split",
            code="no_volumes",
            hint="ingest some data first: voxlake ingest SOURCE --catalog URL --store URL",
        )
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
