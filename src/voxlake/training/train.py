"""Train :class:`~voxlake.training.CNN3D` on a catalog selection, on one process or DDP.

Run ``python -m voxlake.training.train --catalog URL --out DIR`` on one process, or
``torchrun --nproc-per-node N -m voxlake.training.train ...`` for DDP (NCCL on GPUs, gloo on
CPU); :func:`launch` does the latter from Python. The catalog version is pinned at the
start (and recorded in the checkpoint, so a resumed run reads the same data); the
selection is split by ``patient_key`` with :func:`~voxlake.training.split_frame`.

Rank 0 writes to ``out``: ``checkpoint.pt`` (every epoch), ``metrics.json`` and
``curves.png``. Validation and test metrics are computed from every rank's predictions,
gathered and de-duplicated by sample index, so all ranks report the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from voxlake.errors import ConfigError
from voxlake.training import _dist
from voxlake.training._args import (
    STORAGE_OPTIONS_ENV,
    build_parser,
    config_kwargs,
    config_to_argv,
)
from voxlake.training._loop import (
    evaluate,
    load_selection,
    make_loader,
    make_stream,
    save_checkpoint,
    train_epoch,
    write_json,
)
from voxlake.training.metrics import write_curves
from voxlake.training.models import CNN3D
from voxlake.training.split import split_frame
from voxlake.training.world import World

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["TrainConfig", "TrainReport", "launch", "main", "run_training"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Options of one training run.

    Attributes
    ----------
    out
        Output directory (checkpoint, metrics, curves).
    catalog
        Catalog URL; unused when a selection is given.
    store
        Volume store URL; None uses each row's ``store_url``.
    epochs
        Total epochs (a resumed run continues up to this number).
    batch_size
        Samples per step and rank.
    shape
        (D, H, W) volumes are resized to.
    lr
        Adam learning rate.
    seed
        Seeds the weights, the sample order and the split.
    num_workers
        DataLoader worker processes per rank.
    label
        Label name: the float column of ``Catalog.training_selection(label)``.
    fractions
        Train / validation / test shares of patients.
    catalog_version
        Catalog version to read; None: the latest (or the checkpoint's when resuming).
    storage_options
        fsspec options for the catalog and the store.
    resume
        Continue from ``out/checkpoint.pt`` at the epoch after the saved one.
    max_steps_per_epoch
        Stop each training epoch after this many steps (smoke tests).
    prefetch
        Volumes read ahead per DataLoader worker.
    selection
        Parquet file holding a selection (the columns of ``training_selection``); used
        instead of the catalog. :func:`launch` writes it when given a DataFrame.
    """

    out: str
    catalog: str | None = None
    store: str | None = None
    epochs: int = 2
    batch_size: int = 2
    shape: tuple[int, int, int] = (32, 64, 64)
    lr: float = 1e-4
    seed: int = 0
    num_workers: int = 0
    label: str = "label"
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    catalog_version: int | None = None
    storage_options: dict[str, Any] | None = None
    resume: bool = False
    max_steps_per_epoch: int | None = None
    prefetch: int = 2
    selection: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("epochs and batch_size must be >= 1, num_workers >= 0")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError("max_steps_per_epoch must be >= 1 when given")


@dataclass(frozen=True)
class TrainReport:
    """Outcome of :func:`run_training` (identical on every rank).

    Attributes
    ----------
    epochs
        Epochs completed in total, resumed ones included.
    start_epoch
        First epoch this call trained (> 0 after a resume).
    steps_per_epoch
        Optimizer steps per epoch on each rank (equal on all ranks).
    world_size
        Number of DDP ranks.
    catalog_version
        Catalog version trained on (None for a selection given directly without one).
    history
        One row per epoch: ``epoch``, ``train``, ``validation`` metrics, ``steps_per_rank``.
    test
        Test-split metrics of the final model: ``loss``, ``accuracy``, ``auc``, ``count``.
    checkpoint_path, metrics_path, curves_path
        Files rank 0 wrote.
    weights_sha256
        Digest of the final weights on each rank (DDP replicas must agree).
    """

    epochs: int
    start_epoch: int
    steps_per_epoch: int
    world_size: int
    catalog_version: int | None
    history: list[dict[str, Any]]
    test: dict[str, float]
    checkpoint_path: str
    metrics_path: str
    curves_path: str
    weights_sha256: list[str] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        """Metrics of the last epoch."""
        return self.history[-1] if self.history else {}


def run_training(
    config: TrainConfig,
    selection: pd.DataFrame | None = None,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainReport:
    """Train, validate each epoch, test at the end; checkpoint and report on rank 0.

    Parameters
    ----------
    config
        Run options.
    selection
        A training selection (the columns of ``Catalog.training_selection``: ``volume_id``,
        ``store_url``, ``store_path``, ``patient_key``, intensity statistics and the
        ``config.label`` column). When given, the catalog is not opened and
        ``config.catalog_version`` is only recorded.
    on_epoch
        Called on rank 0 with each epoch's history row (the CLI prints it).

    Returns
    -------
    TrainReport
        Identical on every rank.

    Notes
    -----
    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is created here (NCCL on
    CUDA, gloo otherwise) and destroyed on return; an already initialised group is used
    as is. Every rank streams the same number of samples, so DDP steps match.
    """
    created, device = _dist.setup_distributed()
    try:
        return _run(config, selection, device, on_epoch)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(
    config: TrainConfig,
    selection: pd.DataFrame | None,
    device: torch.device,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> TrainReport:
    world = World.detect()
    out = Path(config.out)
    paths = {name: out / name for name in ("checkpoint.pt", "metrics.json", "curves.png")}
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    checkpoint: dict[str, Any] | None = None
    version = config.catalog_version
    if config.resume:
        if not paths["checkpoint.pt"].exists():
            raise ConfigError(f"cannot resume: no checkpoint at {paths['checkpoint.pt']}")
        checkpoint = torch.load(paths["checkpoint.pt"], map_location="cpu", weights_only=True)
        saved = checkpoint.get("catalog_version")
        if version is not None and saved is not None and int(saved) != version:
            raise ConfigError(f"checkpoint was trained on catalog version {saved}, not {version}")
        version = saved if version is None else version

    frame, version = load_selection(config, selection, version)
    by = "patient_key" if "patient_key" in frame.columns else "volume_id"
    if by != "patient_key":
        logger.warning("selection has no patient_key column: splitting by volume_id")
    frame = split_frame(frame, by=by, fractions=config.fractions, seed=config.seed)
    streams = {
        name: make_stream(config, frame[frame["split"] == name], version, shuffle=name == "train")
        for name in ("train", "validation", "test")
    }
    train_stream = streams["train"]
    if train_stream is None:
        raise ConfigError("the training split is empty", hint="add labelled volumes")
    loaders = {
        name: make_loader(
            stream, batch_size=config.batch_size, num_workers=config.num_workers, device=device
        )
        if stream is not None
        else None
        for name, stream in streams.items()
    }

    train_loader = loaders["train"]
    assert train_loader is not None
    torch.manual_seed(config.seed)
    model = CNN3D(1, config.shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start_epoch, history = 0, list[dict[str, Any]]()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        train_stream.load_state_dict(checkpoint["stream"])
        start_epoch, history = int(checkpoint["epoch"]) + 1, list(checkpoint["history"])
        _dist.restore_rng(checkpoint.get("rng"), world.rank, world.world_size)
    net: torch.nn.Module = model
    if world.is_distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    summary: dict[str, Any] = {
        "catalog_version": version,
        "world_size": world.world_size,
        "num_samples": {n: int((frame["split"] == n).sum()) for n in streams},
        "config": dataclasses.asdict(config),
    }
    steps = int(history[-1]["steps_per_rank"][world.rank]) if history else 0
    for epoch in range(start_epoch, config.epochs):
        train_stream.set_epoch(epoch)
        train_metrics, steps, samples = train_epoch(
            net, train_loader, optimizer, device, config.max_steps_per_epoch
        )
        validation = evaluate(model, loaders["validation"], device)
        row: dict[str, Any] = {
            "epoch": epoch,
            "train": train_metrics,
            "validation": validation,
            "steps_per_rank": _dist.all_gather_objects(steps),
        }
        history.append(row)
        logger.info(
            "epoch %d: train loss %.4f acc %.3f, validation loss %.4f acc %.3f auc %.3f",
            epoch,
            train_metrics["loss"],
            train_metrics["accuracy"],
            validation["loss"],
            validation["accuracy"],
            validation["auc"],
        )
        rng = _dist.all_gather_objects(_dist.rng_state(device))
        if world.is_main:
            if on_epoch is not None:
                on_epoch(row)
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "stream": train_stream.state_dict(samples_yielded=samples),
                "catalog_version": version,
                "config": dataclasses.asdict(config),
                "history": history,
                "rng": rng,
            }
            save_checkpoint(paths["checkpoint.pt"], state)
            write_curves(history, paths["curves.png"])
            write_json(paths["metrics.json"], {**summary, "history": history, "test": None})
        _dist.barrier()

    test = evaluate(model, loaders["test"], device)
    digests = _dist.all_gather_objects(_dist.weights_digest(model))
    report = TrainReport(
        epochs=len(history),
        start_epoch=start_epoch,
        steps_per_epoch=steps,
        world_size=world.world_size,
        catalog_version=version,
        history=history,
        test=test,
        checkpoint_path=str(paths["checkpoint.pt"]),
        metrics_path=str(paths["metrics.json"]),
        curves_path=str(paths["curves.png"]),
        weights_sha256=digests,
    )
    if world.is_main:
        final = {"steps_per_epoch": steps, "history": history, "test": test}
        write_json(paths["metrics.json"], {**summary, **final, "weights_sha256": digests})
    _dist.barrier()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m voxlake.training.train`` (and of ``torchrun -m``)."""
    config = TrainConfig(**config_kwargs(build_parser().parse_args(argv), os.environ))
    _run_and_print(config, None)
    return 0


def _print_epoch(row: dict[str, Any]) -> None:
    train, val = row["train"], row["validation"]
    print(
        f"epoch {row['epoch']}: train loss {train['loss']:.4f} acc {train['accuracy']:.3f}"
        f" | validation loss {val['loss']:.4f} acc {val['accuracy']:.3f}"
        f" auc {val['auc']:.3f}",
        flush=True,
    )


def _run_and_print(config: TrainConfig, selection: pd.DataFrame | None) -> None:
    report = run_training(config, selection, on_epoch=_print_epoch)
    if World.detect().is_main:
        test = ", ".join(f"{k} {v:.3f}" for k, v in report.test.items() if isinstance(v, float))
        print(f"test: {test}; metrics in {report.metrics_path}", flush=True)


def launch(config: TrainConfig, nproc: int, *, selection: pd.DataFrame | None = None) -> int:
    """Run training on ``nproc`` local processes (torchrun) or in this process.

    Parameters
    ----------
    config
        Run options.
    nproc
        Processes (DDP ranks) on this machine; 1 trains in-process.
    selection
        Optional selection DataFrame; for ``nproc > 1`` it is written to
        ``out/selection.parquet`` and passed to the ranks.

    Returns
    -------
    int
        Exit status (0 on success; torchrun's status otherwise).
    """
    if nproc <= 1:
        _run_and_print(config, selection)
        return 0
    if selection is not None:
        Path(config.out).mkdir(parents=True, exist_ok=True)
        path = Path(config.out) / "selection.parquet"
        selection.to_parquet(path)
        config = dataclasses.replace(config, selection=str(path))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(nproc), "-m", "voxlake.training.train", *config_to_argv(config),
    ]  # fmt: skip
    env = dict(os.environ)
    if config.storage_options:
        env[STORAGE_OPTIONS_ENV] = json.dumps(config.storage_options)
    return subprocess.run(command, check=False, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
