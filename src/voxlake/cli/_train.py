"""``voxlake train`` and ``voxlake demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from voxlake.cli._app import app, console, interrupted, out
from voxlake.cli._catalog import print_frame
from voxlake.cli._ingest import run_ingest


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
    try:
        code = launch(config, nproc=nproc)
    except KeyboardInterrupt:
        raise interrupted(
            f"{out_dir / 'checkpoint.pt'} holds the last epoch finished (or the last "
            "--checkpoint-every-steps step): the same command with --resume goes on from it"
        ) from None
    if code:
        raise typer.Exit(code)


# --------------------------------------------------------------------------- demo
@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for everything.")] = Path(
        "demo-out"
    ),
    seed: Annotated[int, typer.Option(min=0, help="Sample data seed.")] = 0,
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
    run_ingest([str(data_dir / "dicom")], catalog=str(catalog), store=str(store), config=config)
    attach_labels(catalog, manifest.labels_csv, secret=DEMO_SECRET, on="SeriesInstanceUID")
    console.rule("3/4 catalog")
    cat = open_catalog(catalog)
    summary = cat.sql(
        "SELECT modality, count(*) AS volumes, sum(n_slices) AS slices, "
        "round(sum(nbytes) / 1e6, 1) AS mb FROM volumes GROUP BY 1 ORDER BY 1"
    )
    print_frame(summary, "table")
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
