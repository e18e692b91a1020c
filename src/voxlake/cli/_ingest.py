"""``voxlake sample-data``, ``ingest`` and ``verify``."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from voxlake.cli._app import app, console, interrupted, out, parse_storage_options
from voxlake.errors import VoxlakeError

if TYPE_CHECKING:
    from voxlake.ingest.report import IngestReport


@app.command("sample-data")
def sample_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write into (created).")],
    seed: Annotated[int, typer.Option(min=0, help="Random seed: same seed, same bytes.")] = 0,
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
#: Printed after a run with failures: each code with a count and an example message.
FAILURES_QUERY = (
    "SELECT code, stage, count(*) AS n, any_value(message) AS example FROM failures "
    "GROUP BY ALL ORDER BY n DESC"
)
WARNINGS_QUERY = (
    "SELECT code, count(*) AS files, any_value(url) AS example FROM (SELECT url,"
    " unnest(warnings) AS code FROM instances) GROUP BY code ORDER BY files DESC"
)


#: Shorter de-identification secrets are warned about (the keys are HMACs of it).
MIN_SECRET_CHARS = 16


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
        ("throughput", f"{report.mb_per_s:.1f} MB/s, {_rate(report.files_per_s)} files/s"),
        ("catalog version", report.catalog_version),
    ):
        table.add_row(name, str(value))
    if report.volumes_retired:
        table.add_row(
            "volumes retired (their files changed or are gone)", str(report.volumes_retired)
        )
    if report.files_pruned:
        table.add_row("files gone from the sources: rows pruned", str(report.files_pruned))
    elif report.files_missing:
        table.add_row(
            "files gone from the sources (kept; --prune drops them)", str(report.files_missing)
        )
    for code, count in sorted(report.failures_by_code.items()):
        table.add_row(f"  failure: {code}", str(count))
    for code, count in sorted(report.warnings_by_code.items()):
        table.add_row(f"  warning: {code}", str(count))
    out.print(table)


def _rate(value: float) -> str:
    """``212``, but ``0.4`` rather than ``0`` for a run that read a file or two."""
    return f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}"


def _options_or(
    text: str | None, configured: dict[str, Any] | None, shared: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The JSON options in `text` (``{}``: none at all); when not given, the configured
    options of that target, else the shared ones (``--storage-options``)."""
    if text is not None:
        return parse_storage_options(text) or {}
    return shared if configured is None else configured


def run_ingest(
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
    try:
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
    except KeyboardInterrupt:
        raise interrupted(
            "what the run committed stays in the catalog (runs says 'interrupted'), and "
            "nothing half-written is visible: run the same command again to finish"
        ) from None
    _print_report(report)
    for source in report.empty_sources:
        console.print(f"warning: no file found under {source}", soft_wrap=True, markup=False)
    if report.headers_only and report.status == "completed":
        console.print(
            "headers only: run the same command with --store URL (without --headers-only)"
            " to build the volumes; unchanged files are not read again"
        )
    if report.failures:
        console.print(
            "what failed and why (docs/reliability.md explains each code): voxlake catalog "
            f"query {shlex.quote(report.catalog_url)} {shlex.quote(FAILURES_QUERY)}",
            soft_wrap=True,
        )
    if report.warnings_by_code:
        console.print(
            "files read with warnings (kept; docs/reliability.md explains each code): voxlake"
            f" catalog query {shlex.quote(report.catalog_url)} {shlex.quote(WARNINGS_QUERY)}",
            soft_wrap=True,
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
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Drop the catalog rows of files that were catalogued under these sources and"
            " are gone from them (deleted, moved, renamed); their volumes are retired or"
            " rebuilt from the rest. A source that lists nothing is never pruned.",
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
    pacs_cache_bytes: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="Bytes of PACS instances each worker keeps on its local disk so the PACS"
            " sends each once (default 8 GiB; 0: none, every instance retrieved twice)."
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
    catalog_storage_options: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="JSON options for the catalog alone, when it lives elsewhere than the "
            "sources (another endpoint or credentials). Default: the config file's "
            "catalog_storage_options, else --storage-options."
        ),
    ] = None,
    store_storage_options: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="JSON options for the volume store alone. Default: the config file's "
            "store_storage_options, else --storage-options."
        ),
    ] = None,
) -> None:
    """Ingest DICOM into a catalog and a volume store with a Dask cluster.

    Example: `voxlake ingest data/sample/dicom --catalog out/catalog --store out/volumes.zarr`

    Sources: folders, files, .zip/.tar(.gz) archives (read member by member) or a part of
    one (`zip://P001::/data/a.zip`), s3:// (or any fsspec) prefixes, and PACS queries such as
    `dicomweb+http://pacs:8042/dicom-web?StudyInstanceUID=1.2.3` (DICOMweb) or
    `dimse://PACS@pacs:104?StudyInstanceUID=1.2.3` (C-FIND and C-GET).

    Re-running the same command adds nothing; changed and new files are picked up.
    """
    from voxlake.config import load_config

    config = load_config(config_file)
    overrides: dict[str, Any] = {"on_error": on_error}
    if headers_only:
        overrides["headers_only"] = True
    if prune:
        overrides["prune"] = True
    for name, value in (
        ("workers", workers),
        ("scheduler", scheduler),
        ("memory_limit", memory_limit),
        ("batch_size", batch_size),
        ("read_ahead", read_ahead),
        ("pacs_cache_bytes", pacs_cache_bytes),
        ("secret", secret),
        ("storage_options", parse_storage_options(storage_options)),
    ):
        if value is not None:
            overrides[name] = value
    config = dataclasses.replace(config, **overrides)
    if store is None and not config.headers_only:
        raise typer.BadParameter("--store is required unless --headers-only", param_hint="--store")
    if config.scheduler:
        local = [
            f"--{n.replace('_', '-')}"
            for n, v in (("workers", workers), ("memory_limit", memory_limit))
            if v is not None
        ]
        if local:
            console.print(
                f"warning: {' and '.join(local)} ignored: the cluster at {config.scheduler}"
                " has its own workers",
                soft_wrap=True,
                markup=False,
            )
    if len(config.require_secret()) < MIN_SECRET_CHARS:
        console.print(
            f"warning: the de-identification secret has fewer than {MIN_SECRET_CHARS}"
            " characters, so the keys in the catalog could be traced back to patients by"
            " guessing it; use a long random one, e.g. from"
            " python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            soft_wrap=True,
            markup=False,
        )
    report = run_ingest(
        sources,
        catalog=catalog,
        store=store,
        config=config,
        catalog_storage_options=_options_or(
            catalog_storage_options, config.catalog_storage_options, config.storage_options
        ),
        store_storage_options=_options_or(
            store_storage_options, config.store_storage_options, config.storage_options
        ),
    )
    if report.status != "completed":
        raise typer.Exit(1)


@app.command()
def verify(
    input_dir: Annotated[
        Path,
        typer.Argument(
            help="DICOM (or NIfTI) folder to ingest for references without their own input."
        ),
    ],
    reference_dir: Annotated[
        Path, typer.Argument(help="Folder searched recursively for reference .nii/.nii.gz.")
    ],
    workers: Annotated[int, typer.Option(help="Local Dask worker processes.")] = 2,
) -> None:
    """Ingest a folder and compare every reference NIfTI with the matching volume.

    Example: `voxlake verify dcm_qa/In dcm_qa/Ref`

    The input ingested for a reference: a file under a `Ref*` folder whose parent also
    holds an `In` folder (dcm2niix's dcm_qa layout) uses that `In`, not INPUT_DIR;
    `X_ground_truth*.nii[.gz]` next to a folder `X` (dicom2nifti's layout) uses `X`;
    any other reference uses INPUT_DIR. Lines name the input when it is not INPUT_DIR.

    Prints one line per reference (shape, voxel equality after reorientation to
    canonical, affine error in mm) and `matched N of M`; exits 1 unless all match, 2
    when INPUT_DIR or REFERENCE_DIR is missing or REFERENCE_DIR holds no .nii/.nii.gz.
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
