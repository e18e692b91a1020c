"""The ``voxlake`` command line (the only place that sets up logging and draws progress).

Errors print as one line plus a hint; ``voxlake --debug ...`` shows the traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from voxlake import __version__
from voxlake.errors import VoxlakeError

if TYPE_CHECKING:
    from voxlake.ingest.pipeline import IngestReport

__all__ = ["app", "main"]

console = Console(stderr=True)
out = Console()

app = typer.Typer(
    name="voxlake",
    help="Turn imaging archives into training data: ingest, catalog, stream, train.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)
catalog_app = typer.Typer(
    help="Query and maintain a catalog.", no_args_is_help=True, rich_markup_mode="markdown"
)
app.add_typer(catalog_app, name="catalog")

_STATE: dict[str, bool] = {}  # set once per process by the root callback


def _version(value: bool) -> None:
    if value:
        out.print(f"voxlake {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show info logs.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """voxlake: DICOM / NIfTI archives -> Delta catalog + OME-Zarr store -> PyTorch."""
    _STATE["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _parse_storage_options(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VoxlakeError(
            "storage options must be a JSON object", code="config", hint="e.g. '{\"anon\": true}'"
        ) from exc
    if not isinstance(value, dict):
        raise VoxlakeError("storage options must be a JSON object", code="config")
    return value


# --------------------------------------------------------------------------- sample-data
@app.command("sample-data")
def sample_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write into (created).")],
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    profile: Annotated[
        str, typer.Option(help="demo (realistic sizes) or tiny (for tests).")
    ] = "demo",
) -> None:
    """Write realistic synthetic DICOM series and a labels.csv.

    Example: `voxlake sample-data data/sample --seed 0`
    """
    from voxlake.testing import generate_sample_data

    if profile not in ("demo", "tiny"):
        raise VoxlakeError(f"unknown profile {profile!r}", code="config", hint="use demo or tiny")
    with console.status("writing sample DICOM..."):
        manifest = generate_sample_data(out_dir, seed=seed, profile=profile)  # type: ignore[arg-type]
    files = sum(len(s.files) for s in manifest.series)
    out.print(
        f"wrote {len(manifest.series)} series ({files} files) to {manifest.root / 'dicom'}"
        f"\nlabels: {manifest.labels_csv}"
    )


# --------------------------------------------------------------------------- ingest
def _print_report(report: IngestReport) -> None:
    table = Table(title=f"ingest run {report.run_id}: {report.status}", show_header=False)
    for name, value in (
        ("files listed", report.files_seen),
        ("files skipped (unchanged)", report.files_skipped),
        ("instances catalogued", report.instances),
        ("volumes written", report.volumes_written),
        ("volumes up to date", report.volumes_skipped),
        ("failures", report.failures),
        ("MB read", f"{report.bytes_read / 1e6:.1f}"),
        ("duration", f"{report.duration_s:.1f} s"),
        ("throughput", f"{report.mb_per_s:.1f} MB/s, {report.files_per_s:.0f} files/s"),
        ("catalog version", report.catalog_version),
    ):
        table.add_row(name, str(value))
    for code, count in sorted(report.failures_by_code.items()):
        table.add_row(f"  failure: {code}", str(count))
    out.print(table)


def _run_ingest(
    sources: list[str],
    *,
    catalog: str,
    store: str,
    config: Any,
    catalog_storage_options: dict[str, Any] | None = None,
    store_storage_options: dict[str, Any] | None = None,
) -> IngestReport:
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from voxlake.ingest import ProgressEvent, ingest

    progress = Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    tasks: dict[str, Any] = {}
    started = time.perf_counter()

    def on_progress(event: ProgressEvent) -> None:
        if event.stage not in tasks:
            tasks[event.stage] = progress.add_task(event.stage, total=event.total, rate="")
        elapsed = max(time.perf_counter() - started, 1e-6)
        rate = f"{event.done / elapsed:.0f}/s"
        if event.bytes:
            rate += f" {event.bytes / 1e6 / elapsed:.0f} MB/s"
        progress.update(tasks[event.stage], completed=event.done, total=event.total, rate=rate)

    if not config.scheduler:
        console.print(f"starting a local Dask cluster ({config.workers} workers)...")
    with progress:
        report = ingest(
            sources,
            catalog=catalog,
            store=store,
            config=config,
            catalog_storage_options=catalog_storage_options,
            store_storage_options=store_storage_options,
            progress=on_progress,
        )
    if report.dashboard_link:
        console.print(f"Dask dashboard was at {report.dashboard_link}")
    _print_report(report)
    return report


@app.command()
def ingest(
    sources: Annotated[list[str], typer.Argument(help="Folders, files or URLs (s3://...).")],
    catalog: Annotated[str, typer.Option(help="Catalog root (path or s3:// URL).")],
    store: Annotated[str, typer.Option(help="Volume store root (path or s3:// URL).")],
    workers: Annotated[Optional[int], typer.Option(help="Local Dask worker processes.")] = None,  # noqa: UP045
    scheduler: Annotated[
        Optional[str], typer.Option(help="Existing Dask scheduler, tcp://HOST:PORT.")  # noqa: UP045
    ] = None,
    memory_limit: Annotated[
        Optional[str], typer.Option(help="Memory per local worker, e.g. 4GiB.")  # noqa: UP045
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Files per header task.")] = None,  # noqa: UP045
    secret: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="De-identification secret (default: $VOXLAKE_SECRET)."),
    ] = None,
    config_file: Annotated[
        Optional[Path], typer.Option("--config", help="TOML file with an [ingest] table.")  # noqa: UP045
    ] = None,
    on_error: Annotated[
        str, typer.Option(help="quarantine (record and go on) or raise (stop).")
    ] = "quarantine",
    storage_options: Annotated[
        Optional[str], typer.Option(help="JSON fsspec options for the sources.")  # noqa: UP045
    ] = None,
) -> None:
    """Ingest DICOM into a catalog and a volume store with a Dask cluster.

    Example: `voxlake ingest data/sample/dicom --catalog out/catalog --store out/volumes.zarr`

    Re-running the same command adds nothing; changed and new files are picked up.
    """
    from voxlake.config import load_config

    config = load_config(config_file)
    overrides: dict[str, Any] = {"on_error": on_error}
    for name, value in (
        ("workers", workers),
        ("scheduler", scheduler),
        ("memory_limit", memory_limit),
        ("batch_size", batch_size),
        ("secret", secret),
        ("storage_options", _parse_storage_options(storage_options)),
    ):
        if value is not None:
            overrides[name] = value
    config = dataclasses.replace(config, **overrides)
    config.require_secret()
    report = _run_ingest(sources, catalog=catalog, store=store, config=config)
    if report.status != "completed":
        raise typer.Exit(1)


# --------------------------------------------------------------------------- catalog
def _print_frame(frame: Any, fmt: str) -> None:
    if fmt == "csv":
        out.print(frame.to_csv(index=False), end="")
    elif fmt == "json":
        out.print(frame.to_json(orient="records", date_format="iso"))
    else:
        table = Table(show_lines=False)
        for column in frame.columns:
            table.add_column(str(column))
        for row in frame.itertuples(index=False):
            table.add_row(*(str(v) for v in row))
        out.print(table)


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
        table.add_row(f"  volumes {modality}", str(count))
    for code, count in info["failures_by_code"].items():
        table.add_row(f"  failure {code}", str(count))
    out.print(table)


@catalog_app.command("query")
def catalog_query(
    url: Annotated[str, typer.Argument(help="Catalog root.")],
    sql: Annotated[
        str, typer.Argument(help="DuckDB SQL over instances, volumes, failures, runs, labels.")
    ],
    version: Annotated[Optional[int], typer.Option(help="Catalog version to read.")] = None,  # noqa: UP045
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Run SQL against the catalog.

    Example:
    `voxlake catalog query out/catalog "SELECT modality, count(*) AS n FROM volumes GROUP BY 1"`
    """
    from voxlake.catalog import open_catalog

    _print_frame(open_catalog(url, version=version).sql(sql), fmt)


@catalog_app.command("history")
def catalog_history(url: Annotated[str, typer.Argument(help="Catalog root.")]) -> None:
    """List catalog versions with the run and operation that made each.

    Example: `voxlake catalog history out/catalog`
    """
    from voxlake.catalog import open_catalog

    frame = open_catalog(url).history()
    _print_frame(frame[["version", "committed_at", "run_id", "operation", "status"]], "table")


@catalog_app.command("attach-labels")
def catalog_attach_labels(
    url: Annotated[str, typer.Argument(help="Catalog root.")],
    labels_csv: Annotated[Path, typer.Argument(help="CSV keyed by an original identifier.")],
    on: Annotated[
        str, typer.Option(help="PatientID, StudyInstanceUID or SeriesInstanceUID.")
    ] = "SeriesInstanceUID",
    secret: Annotated[
        Optional[str], typer.Option(help="Secret used at ingest (default: $VOXLAKE_SECRET).")  # noqa: UP045
    ] = None,
) -> None:
    """Attach labels keyed by original identifiers (hashed at attach time).

    Example: `voxlake catalog attach-labels out/catalog data/sample/labels.csv`
    """
    from voxlake.catalog import attach_labels
    from voxlake.config import resolve_secret

    version = attach_labels(url, labels_csv, secret=resolve_secret(secret), on=on)
    out.print(f"labels attached; catalog version {version}")


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

    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(render_schema_markdown())
    out.print(f"wrote {out_file}")


# --------------------------------------------------------------------------- train
@app.command()
def train(
    catalog: Annotated[str, typer.Option(help="Catalog root.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for checkpoint, metrics, plot.")],
    store: Annotated[
        Optional[str], typer.Option(help="Store root (default: from the catalog rows).")  # noqa: UP045
    ] = None,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Batch size per rank.")] = 2,
    shape: Annotated[
        tuple[int, int, int], typer.Option(help="Input shape D H W volumes are resized to.")
    ] = (32, 64, 64),
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Seed for splits, order and weights.")] = 0,
    nproc: Annotated[int, typer.Option(help="Processes (DDP ranks) on this node.")] = 1,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers per rank.")] = 0,
    label: Annotated[str, typer.Option(help="Label name attached to the catalog.")] = "label",
    version: Annotated[Optional[int], typer.Option(help="Catalog version to pin.")] = None,  # noqa: UP045
    resume: Annotated[bool, typer.Option(help="Resume from OUT/checkpoint.pt.")] = False,
) -> None:
    """Train the tutorial 3D CNN on catalog volumes (DDP with --nproc > 1).

    Example: `voxlake train --catalog out/catalog --out out/train --epochs 2`
    """
    from voxlake.training.train import TrainConfig, launch

    config = TrainConfig(
        catalog=catalog,
        store=store,
        out=str(out_dir),
        epochs=epochs,
        batch_size=batch_size,
        shape=shape,
        lr=lr,
        seed=seed,
        num_workers=num_workers,
        label=label,
        catalog_version=version,
        resume=resume,
    )
    code = launch(config, nproc=nproc)
    if code:
        raise typer.Exit(code)


# --------------------------------------------------------------------------- demo
@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for everything.")] = Path(
        "demo-out"
    ),
    seed: Annotated[int, typer.Option(help="Sample data seed.")] = 0,
    workers: Annotated[int, typer.Option(help="Local Dask workers.")] = 2,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 2,
    profile: Annotated[str, typer.Option(help="Sample profile: demo or tiny.")] = "demo",
) -> None:
    """Run the whole pipeline on generated data: sample -> ingest -> catalog -> train.

    Uses a fixed demo secret (never use it for real data). Example: `voxlake demo --out demo-out`
    """
    from voxlake.catalog import attach_labels, open_catalog
    from voxlake.config import DEMO_SECRET, IngestConfig
    from voxlake.testing import generate_sample_data
    from voxlake.training.train import TrainConfig, launch

    out_dir = out_dir.resolve()
    data_dir, catalog, store = out_dir / "sample", out_dir / "catalog", out_dir / "volumes.zarr"
    console.rule("1/4 sample data")
    with console.status("writing synthetic DICOM..."):
        manifest = generate_sample_data(data_dir, seed=seed, profile=profile)  # type: ignore[arg-type]
    out.print(f"{len(manifest.series)} series in {data_dir / 'dicom'}")
    console.rule("2/4 ingest")
    console.print("[yellow]demo secret in use: for real data set VOXLAKE_SECRET[/yellow]")
    config = IngestConfig(secret=DEMO_SECRET, workers=workers)
    _run_ingest([str(data_dir / "dicom")], catalog=str(catalog), store=str(store), config=config)
    attach_labels(catalog, manifest.labels_csv, secret=DEMO_SECRET, on="SeriesInstanceUID")
    console.rule("3/4 catalog")
    cat = open_catalog(catalog)
    summary = cat.sql(
        "SELECT modality, count(*) AS volumes, sum(n_slices) AS slices, "
        "round(sum(nbytes) / 1e6, 1) AS mb FROM volumes GROUP BY 1 ORDER BY 1"
    )
    _print_frame(summary, "table")
    console.rule("4/4 train")
    train_dir = out_dir / "train"
    code = launch(
        TrainConfig(catalog=str(catalog), out=str(train_dir), epochs=epochs, seed=seed), nproc=1
    )
    if code:
        raise typer.Exit(code)
    table = Table(title="outputs", show_header=False)
    table.add_row("sample DICOM", str(data_dir / "dicom"))
    table.add_row("labels", str(manifest.labels_csv))
    table.add_row("catalog (Delta)", str(catalog))
    table.add_row("volume store (OME-Zarr)", str(store))
    for name in ("checkpoint.pt", "metrics.json", "curves.png"):
        table.add_row(name, str(train_dir / name))
    out.print(table)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one-line errors with a hint unless --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args, standalone_mode=False)
    except VoxlakeError as exc:
        if "--debug" in args:
            raise
        console.print(f"[red]error[/red] {escape(f'[{exc.code}]')} {escape(exc.message)}")
        if exc.hint:
            console.print(f"hint: {exc.hint}")
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if "--debug" in args:
            raise
        console.print(f"[red]error[/red] {type(exc).__name__}: {exc}")
        console.print("hint: run again with --debug for the traceback")
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
