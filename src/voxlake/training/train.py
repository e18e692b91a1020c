"""Train :class:`~voxlake.training.CNN3D` on a catalog selection, on one process or DDP.

Run ``python -m voxlake.training.train --catalog URL --out DIR`` on one process, or
``torchrun --nproc-per-node N -m voxlake.training.train ...`` for DDP (NCCL on GPUs, gloo on
CPU); :func:`launch` does the latter from Python. The catalog version is pinned at the
start (and recorded in the checkpoint, so a resumed run reads the same data); the
selection is split by ``patient_key`` with :func:`~voxlake.training.split_frame`.

Rank 0 writes to ``out``: ``checkpoint.pt`` (every epoch, and every
``checkpoint_every_steps`` steps with the stream position, so a killed run resumes
mid-epoch and delivers exactly the rest of the epoch), ``metrics.json`` and
``curves.png``. In patch mode the model sees random patches (``patch_size``).
Validation and test metrics are computed from every rank's predictions, gathered and
de-duplicated by sample number, so all ranks report the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
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
from voxlake.training._config import TrainConfig, TrainReport
from voxlake.training._loop import (
    EpochProgress,
    evaluate,
    load_checkpoint,
    load_selection,
    make_loader,
    make_stream,
    resolve_output,
    resume_point,
    save_training_state,
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


def run_training(
    config: TrainConfig,
    selection: pd.DataFrame | None = None,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
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
    on_step
        Called on every rank with (epoch, step) after each training step and its
        mid-epoch checkpoint, if any.

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
        return _run(config, selection, device, on_epoch, on_step)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(
    config: TrainConfig,
    selection: pd.DataFrame | None,
    device: torch.device,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    on_step: Callable[[int, int], None] | None,
) -> TrainReport:
    world = World.detect()
    # Recorded resolved: the checkpoint and metrics say what the loader delivered.
    output = resolve_output(config, device)
    config = dataclasses.replace(config, output=output)
    out = Path(config.out)
    paths = {name: out / name for name in ("checkpoint.pt", "metrics.json", "curves.png")}
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    checkpoint, version = None, config.catalog_version
    if config.resume:
        checkpoint, version = load_checkpoint(paths["checkpoint.pt"], version)

    frame, version = load_selection(config, selection, version)
    by = "patient_key" if "patient_key" in frame.columns else "volume_id"
    if by != "patient_key":
        logger.warning("selection has no patient_key column: splitting by volume_id")
    if config.split is not None and "split" in frame.columns and frame["split"].notna().all():
        logger.info("using the split %r saved in the catalog", config.split)
    else:
        frame = split_frame(frame, by=by, fractions=config.fractions, seed=config.seed)
    streams = {
        name: make_stream(
            config, frame[frame["split"] == name], version, shuffle=name == "train", output=output
        )
        for name in ("train", "validation", "test")
    }
    train_stream = streams["train"]
    if train_stream is None:
        raise ConfigError("the training split is empty", hint="add labelled volumes")
    loaders = {
        name: make_loader(s, batch_size=config.batch_size, num_workers=config.num_workers,
                          device=device) if s is not None else None
        for name, s in streams.items()
    }  # fmt: skip
    train_loader = loaders["train"]
    assert train_loader is not None
    torch.manual_seed(config.seed)
    model = CNN3D(1, config.input_shape).to(device)
    # One fused kernel per step on GPUs (measured 6% more steps/s for the tutorial CNN on
    # an H200, docs/performance.md); the same state_dict either way, so runs resume across.
    fused = True if device.type == "cuda" else None
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=fused)
    start_epoch, history, progress = 0, list[dict[str, Any]](), None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        train_stream.load_state_dict(checkpoint["stream"])
        start_epoch, progress = resume_point(checkpoint, world.rank)
        history = list(checkpoint["history"])
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

    def state(epoch_done: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch_done,
            "catalog_version": version,
            "config": dataclasses.asdict(config),
            "history": history,
        }

    steps = int(history[-1]["steps_per_rank"][world.rank]) if history else 0
    every = config.checkpoint_every_steps
    for epoch in range(start_epoch, config.epochs):
        train_stream.set_epoch(epoch)

        def step_done(done: EpochProgress, epoch: int = epoch) -> None:
            if every is not None and done.steps % every == 0:
                save_training_state(
                    paths["checkpoint.pt"], device, progress=done, stream=train_stream,
                    samples=done.samples, state=state(epoch - 1),
                )  # fmt: skip
            if on_step is not None:
                on_step(epoch, done.steps)

        train_metrics, steps, samples = train_epoch(
            net, train_loader, optimizer, device, config.max_steps_per_epoch,
            start=progress if epoch == start_epoch else None, on_step=step_done,
        )  # fmt: skip
        validation = evaluate(model, loaders["validation"], device)
        row: dict[str, Any] = {
            "epoch": epoch,
            "train": train_metrics,
            "validation": validation,
            "steps_per_rank": _dist.all_gather_objects(steps),
        }
        history.append(row)
        logger.info(
            "epoch %d: train loss %.4f acc %.3f, validation loss %.4f acc %.3f %s",
            epoch, train_metrics["loss"], train_metrics["accuracy"], validation["loss"],
            validation["accuracy"], _metric("auc", validation["auc"], validation),
        )  # fmt: skip
        save_training_state(
            paths["checkpoint.pt"], device, progress=None, stream=train_stream,
            samples=samples, state=state(epoch),
        )  # fmt: skip
        if world.is_main:
            if on_epoch is not None:
                on_epoch(row)
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
    try:
        _run_and_print(config, None)
    except KeyboardInterrupt:
        # The `voxlake train` (or launch()) that started the ranks sends each one SIGINT
        # when it is stopped, and says so once, with what to do.
        return 130
    return 0


def _print_epoch(row: dict[str, Any]) -> None:
    train, val = row["train"], row["validation"]
    print(
        f"epoch {row['epoch']}: train loss {train['loss']:.4f} acc {train['accuracy']:.3f}"
        f" | validation loss {val['loss']:.4f} acc {val['accuracy']:.3f}"
        f" {_metric('auc', val['auc'], val)}",
        flush=True,
    )


def _metric(name: str, value: float, metrics: dict[str, Any]) -> str:
    """``count 2``, not ``count 2.000``: counts are whole however the metrics store them.
    A metric that has no value says why instead of ``nan``: no samples, or (the AUC)
    samples of one class only."""
    if name == "count" and value.is_integer():
        return f"{name} {int(value)}"
    if math.isnan(value):
        if not metrics.get("count"):
            return f"{name} n/a (no samples)"
        if name == "auc":
            return f"{name} n/a (one class)"
    return f"{name} {value:.3f}"


def _metrics_text(metrics: dict[str, Any]) -> str:
    """The test line's metrics: ``loss 0.693, accuracy 0.500, auc n/a (one class), count 2``."""
    return ", ".join(_metric(k, v, metrics) for k, v in metrics.items() if isinstance(v, float))


def _run_and_print(config: TrainConfig, selection: pd.DataFrame | None) -> None:
    report = run_training(config, selection, on_epoch=_print_epoch)
    if World.detect().is_main:
        print(f"test: {_metrics_text(report.test)}; metrics in {report.metrics_path}", flush=True)


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

    Raises
    ------
    ConfigError
        ``nproc`` is more than the CUDA devices this process sees (NCCL ranks need one
        GPU each); with no CUDA device the ranks run on CPU with gloo.
    """
    if nproc <= 1:
        _run_and_print(config, selection)
        return 0
    _dist.check_gpus_per_rank(nproc, _dist.cuda_device_count())
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
    # torchrun in a session of its own (its ranks have theirs): a terminal's Ctrl-C reaches
    # only this process, which stops the ranks itself (see _stop_ranks).
    torchrun = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return torchrun.wait()
    except KeyboardInterrupt:  # Ctrl-C, a notebook's interrupt, or SIGTERM through the CLI
        _stop_ranks(torchrun)
        raise


def _stop_ranks(torchrun: subprocess.Popen[bytes], grace_s: float = 60.0) -> None:
    """Stop torchrun's ranks with one SIGINT each and wait for them (SIGKILL after ``grace_s``).

    torchrun starts each rank in a session of its own, so no signal sent to this process or
    its group reaches them; and torchrun, stopped by a signal, prints a traceback of its own
    while it stops them. So torchrun is killed first and the ranks are each sent SIGINT,
    on which they stop quietly (``main`` returns 130); the last checkpoint stays. Killing
    torchrun alone (what ``subprocess.run`` did) left the ranks training, orphaned.
    """
    import signal

    import psutil

    try:
        ranks = psutil.Process(torchrun.pid).children()
    except psutil.NoSuchProcess:
        ranks = []
    torchrun.kill()
    torchrun.wait()
    for rank in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.send_signal(signal.SIGINT)
    _, alive = psutil.wait_procs(ranks, timeout=grace_s)
    for rank in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.kill()


if __name__ == "__main__":
    raise SystemExit(main())
