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
    from voxlake.ingest.report import IngestReport

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
docs_app = typer.Typer(
    help="Regenerate the reference pages in docs/ from the code.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(docs_app, name="docs")

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
    if level > logging.INFO:
        # distributed sets its loggers to INFO when imported (scheduler and worker chatter
        # at every start and stop); read by dask's config, so workers inherit it too.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


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
    written = "none: headers only" if report.headers_only else report.volumes_written
    for name, value in (
        ("files listed", report.files_seen),
        ("files skipped (unchanged)", report.files_skipped),
        ("instances catalogued", report.instances),
        ("volumes written", written),
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
    store: str | None,
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
        if event.stage == "cluster":
            if event.message:
                console.print(f"Dask dashboard: {event.message}")
            return
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
    _print_report(report)
    if report.headers_only and report.status == "completed":
        console.print(
            "headers only: run the same command with --store URL (without --headers-only)"
            " to build the volumes; unchanged files are not read again"
        )
    return report


@app.command()
def ingest(
    sources: Annotated[list[str], typer.Argument(help="Folders, files or URLs (s3://...).")],
    catalog: Annotated[str, typer.Option(help="Catalog root (path or s3:// URL).")],
    store: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Volume store root (path or s3:// URL); not needed with --headers-only."),
    ] = None,
    headers_only: Annotated[
        bool,
        typer.Option(
            "--headers-only",
            help="Catalog the files' de-identified headers only: plan and build no volume."
            " A later run without it builds the volumes.",
        ),
    ] = False,
    workers: Annotated[Optional[int], typer.Option(help="Local Dask worker processes.")] = None,  # noqa: UP045
    scheduler: Annotated[
        Optional[str], typer.Option(help="Existing Dask scheduler, tcp://HOST:PORT.")  # noqa: UP045
    ] = None,
    memory_limit: Annotated[
        Optional[str], typer.Option(help="Memory per local worker, e.g. 4GiB.")  # noqa: UP045
    ] = None,
    batch_size: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Files per catalog commit of header rows."),
    ] = None,
    read_ahead: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="Files each header task reads ahead (default: 2 local, 8 remote or PACS,"
            " 1 in archives; 0: none). Lower it to spare a PACS."
        ),
    ] = None,
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
        Optional[str],  # noqa: UP045
        typer.Option(
            help="JSON fsspec options for sources, store and catalog, e.g. "
            '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'. '
            "Default: the AWS_* environment variables."
        ),
    ] = None,
) -> None:
    """Ingest DICOM into a catalog and a volume store with a Dask cluster.

    Example: `voxlake ingest data/sample/dicom --catalog out/catalog --store out/volumes.zarr`

    Sources: folders, files, .zip/.tar(.gz) archives (read member by member), s3:// (or any
    fsspec) prefixes, and PACS queries such as
    `dicomweb+http://pacs:8042/dicom-web?StudyInstanceUID=1.2.3`.

    Re-running the same command adds nothing; changed and new files are picked up.
    """
    from voxlake.config import load_config

    config = load_config(config_file)
    overrides: dict[str, Any] = {"on_error": on_error}
    if headers_only:
        overrides["headers_only"] = True
    for name, value in (
        ("workers", workers),
        ("scheduler", scheduler),
        ("memory_limit", memory_limit),
        ("batch_size", batch_size),
        ("read_ahead", read_ahead),
        ("secret", secret),
        ("storage_options", _parse_storage_options(storage_options)),
    ):
        if value is not None:
            overrides[name] = value
    config = dataclasses.replace(config, **overrides)
    if store is None and not config.headers_only:
        raise typer.BadParameter("--store is required unless --headers-only", param_hint="--store")
    config.require_secret()
    report = _run_ingest(
        sources,
        catalog=catalog,
        store=store,
        config=config,
        catalog_storage_options=config.storage_options,
        store_storage_options=config.storage_options,
    )
    if report.status != "completed":
        raise typer.Exit(1)


@app.command()
def verify(
    input_dir: Annotated[Path, typer.Argument(help="DICOM (or NIfTI) folder to ingest.")],
    reference_dir: Annotated[Path, typer.Argument(help="Folder of reference .nii/.nii.gz.")],
    workers: Annotated[int, typer.Option(help="Local Dask worker processes.")] = 2,
) -> None:
    """Ingest a folder and compare every reference NIfTI with the matching volume.

    Example: `voxlake verify dcm_qa/In dcm_qa/Ref`

    Prints one line per reference (shape, voxel equality after reorientation to
    canonical, affine error in mm) and `matched N of M`; exits 1 unless all match.
    Uses a throwaway catalog, store and secret. See docs/series-assembly.md.
    """
    from voxlake.config import IngestConfig
    from voxlake.ingest.verify import verify as run_verify

    config = IngestConfig(workers=workers, dashboard_address=":0")
    with console.status("ingesting and comparing..."):
        report = run_verify(input_dir, reference_dir, config=config)
    for line in report.lines():
        typer.echo(line)
    if report.matched != report.total:
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
        out.print(f"  {verb}: {path}")


# --------------------------------------------------------------------------- show
def _parse_window(text: str | None) -> str | tuple[float, float] | None:
    if text is None or "," not in text:
        return text
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise VoxlakeError(
            f"cannot read window {text!r}", code="bad_window", hint="e.g. --window 40,400"
        ) from exc
    return level, width


@app.command()
def show(
    catalog: Annotated[str, typer.Argument(help="Catalog root.")],
    volume_id: Annotated[
        Optional[str],  # noqa: UP045
        typer.Argument(help="Volume id or a unique prefix (6+ characters); default: the first."),
    ] = None,
    out_file: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("view.png"),
    window: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="ct-soft, ct-lung, ct-bone, ct-brain, auto, or LEVEL,WIDTH"
            " (default: ct-soft for CT in HU, auto otherwise)."
        ),
    ] = None,
    montage: Annotated[
        bool, typer.Option("--montage", help="Draw an axial slice montage instead.")
    ] = False,
    t: Annotated[int, typer.Option("--t", help="Time point of a 4D volume.")] = 0,
    version: Annotated[Optional[int], typer.Option(help="Catalog version to read.")] = None,  # noqa: UP045
    store: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Volume store root (default: the catalog row's store_url)."),
    ] = None,
    dpi: Annotated[int, typer.Option(help="PNG resolution (12-inch-wide figure).")] = 100,
) -> None:
    """Draw a volume: axial, coronal and sagittal planes through its centre, or a montage.

    Panels follow the radiological convention (patient's right on the image's left,
    superior up) with physical aspect ratios from the voxel spacing.

    Examples: `voxlake show out/catalog --out view.png`,
    `voxlake show out/catalog --window ct-lung --montage --out montage.png`
    """
    from voxlake.viz import load_volume, plot_montage, plot_triplanar, save_figure

    with console.status("reading the volume..."):
        view = load_volume(catalog, volume_id, version=version, store=store)
        parsed = _parse_window(window)
        figure = (
            plot_montage(view, window=parsed, t=t)
            if montage
            else plot_triplanar(view, window=parsed, t=t)
        )
        save_figure(figure, out_file, dpi=dpi)
    if volume_id is None:
        console.print(f"no VOLUME_ID given: showing the first volume, {view.volume_id}")
    out.print(f"wrote {out_file} ({view.title})")


# --------------------------------------------------------------------------- docs
@docs_app.command("cli")
def docs_cli(
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the Markdown.")] = Path(
        "docs/cli.md"
    ),
) -> None:
    """Regenerate the command-line reference from the typer app.

    Example: `voxlake docs cli --out docs/cli.md`
    """
    from voxlake._docgen import render_cli_markdown

    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(render_cli_markdown())
    out.print(f"wrote {out_file}")


@docs_app.command("config")
def docs_config(
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the Markdown.")] = Path(
        "docs/configuration.md"
    ),
) -> None:
    """Regenerate the configuration reference from the configuration dataclasses.

    Example: `voxlake docs config --out docs/configuration.md`
    """
    from voxlake._docgen import render_config_markdown

    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(render_config_markdown())
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
    split: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Use this split saved with `voxlake catalog split` (default: hash "
            "patient_key with the default fractions)."
        ),
    ] = None,
    version: Annotated[Optional[int], typer.Option(help="Catalog version to pin.")] = None,  # noqa: UP045
    resume: Annotated[bool, typer.Option(help="Resume from OUT/checkpoint.pt.")] = False,
    mode: Annotated[str, typer.Option(help="volume (resized) or patch (random boxes).")] = (
        "volume"
    ),
    patch_size: Annotated[
        tuple[int, int, int], typer.Option(help="Patch size D H W in patch mode.")
    ] = (96, 96, 96),
    patches_per_volume: Annotated[int, typer.Option(help="Patches per volume and epoch.")] = 1,
    sampler: Annotated[str, typer.Option(help="uniform or foreground (patch mode).")] = "uniform",
    checkpoint_every_steps: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Also checkpoint within epochs (exact mid-epoch resume)."),
    ] = None,
    output: Annotated[
        str,
        typer.Option(
            help="float32 (normalised by the loader), stored (the stored dtype, half "
            "the bytes for int16 CT, normalised on the training device), or auto: stored "
            "on a CUDA device in patch mode, float32 otherwise."
        ),
    ] = "auto",
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
        split=split,
        catalog_version=version,
        resume=resume,
        mode=mode,  # type: ignore[arg-type]  # validated by TrainConfig
        patch_size=patch_size,
        patches_per_volume=patches_per_volume,
        sampler=sampler,  # type: ignore[arg-type]
        checkpoint_every_steps=checkpoint_every_steps,
        output=output,  # type: ignore[arg-type]  # validated by TrainConfig
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
        # soft_wrap: one line whatever the terminal width (paths stay copyable).
        message = f"[red]error[/red] {escape(f'[{exc.code}]')} {escape(exc.message)}"
        console.print(message, soft_wrap=True)
        if exc.hint:
            console.print(f"hint: {escape(exc.hint)}", soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        import click

        # typer >= 0.20 vendors click (typer._click): its usage errors are not click's.
        exit_code = getattr(exc, "exit_code", None)
        usage_error = isinstance(exc, click.exceptions.ClickException) or (
            callable(getattr(exc, "show", None)) and isinstance(exit_code, int)
        )
        if usage_error:
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if "--debug" in args:
            raise
        console.print(f"[red]error[/red] {type(exc).__name__}: {escape(str(exc))}", soft_wrap=True)
        console.print("hint: run again with --debug for the traceback")
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
