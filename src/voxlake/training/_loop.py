"""The pieces of a training run: selection, streams, one epoch, one evaluation, files."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from voxlake.errors import ConfigError
from voxlake.training import _dist
from voxlake.training.datasets import VolumeStream
from voxlake.training.device import normalize_on_device
from voxlake.training.metrics import binary_metrics
from voxlake.training.world import World

if TYPE_CHECKING:
    import pandas as pd
    from torch.utils.data import DataLoader

    from voxlake.training.train import TrainConfig

__all__ = [
    "EpochProgress",
    "autocast",
    "evaluate",
    "load_checkpoint",
    "load_selection",
    "make_loader",
    "make_stream",
    "resolve_output",
    "resume_point",
    "save_checkpoint",
    "save_training_state",
    "train_epoch",
    "write_json",
]


def make_loader(
    stream: VolumeStream, *, batch_size: int, num_workers: int, device: torch.device
) -> DataLoader[Any]:
    from torch.utils.data import DataLoader

    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        # The stream shares its epoch and resume point with its workers, so they can live
        # for the whole run instead of being forked again every epoch.
        persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda",
        # The stream does not use torch's worker seeds; a private generator keeps the
        # iterator's seed draw off the global RNG, so a mid-epoch resume (which creates
        # one iterator more than the uninterrupted run) leaves dropout's stream intact.
        generator=torch.Generator().manual_seed(stream.seed),
    )


def resolve_output(config: TrainConfig, device: torch.device) -> Literal["float32", "stored"]:
    """``config.output`` with ``"auto"`` decided for ``device``.

    The stored dtype on CUDA in patch mode (half the bytes through the loader, normalised
    on the GPU, bit for bit the float32 values; patches are never resized), float32
    otherwise: volume mode usually resizes, and on CPU the normalisation would only move
    from the loader's workers into the training process.
    """
    if config.output != "auto":
        return config.output
    return "stored" if device.type == "cuda" and config.mode == "patch" else "float32"


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # bf16 autocast on GPUs only: CPU bf16 convolutions are slow and gain nothing here.
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class EpochProgress:
    """Where a rank is within a training epoch: what a mid-epoch checkpoint restores.

    ``totals`` (loss sum, correct, count) may be given as the training loop's device
    tensor, which later steps keep adding to: it is read (which waits for the GPU) only
    when asked for, so a step that only reports its progress leaves the host free to queue
    the next one. Read it in the ``on_step`` callback that receives it.
    """

    def __init__(
        self, steps: int = 0, samples: int = 0, totals: Sequence[float] | torch.Tensor = ()
    ) -> None:
        self.steps, self.samples = steps, samples
        self._totals = totals if len(totals) else [0.0, 0.0, 0.0]

    @property
    def totals(self) -> list[float]:
        values = self._totals
        return [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]


def train_epoch(
    model: torch.nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    max_steps: int | None,
    *,
    start: EpochProgress | None = None,
    on_step: Callable[[EpochProgress], None] | None = None,
) -> tuple[dict[str, float], int, int]:
    """Train one epoch (or its rest, from ``start``); return metrics summed over ranks,
    this rank's steps and samples. ``on_step`` sees the progress after each step."""
    criterion = torch.nn.BCEWithLogitsLoss()
    model.train()
    progress = start or EpochProgress()
    # loss sum, correct, count
    totals = torch.tensor(progress.totals, dtype=torch.float64, device=device)
    steps, samples = progress.steps, progress.samples
    for batch in loader:
        if max_steps is not None and steps >= max_steps:
            break
        batch = normalize_on_device(batch, device)
        images, labels = batch["image"], batch["label"]
        with autocast(device):
            logits = model(images).squeeze(1)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            correct = ((logits.float() >= 0) == (labels >= 0.5)).sum()
            count = labels.numel()
            # In place, from device values and Python scalars: a tensor made from a host
            # value here would be a copy that makes the host wait for the GPU every step.
            totals[0] += loss.detach().double() * count
            totals[1] += correct
            totals[2] += count
        steps += 1
        samples += int(count)
        if on_step is not None:
            on_step(EpochProgress(steps, samples, totals))  # read only if checkpointing
        if max_steps is not None and steps >= max_steps:
            break
    if _dist.is_distributed():
        import torch.distributed as dist

        dist.all_reduce(totals)
    loss_sum, correct_sum, count = (float(v) for v in totals.tolist())
    metrics = {
        "loss": loss_sum / count if count else math.nan,
        "accuracy": correct_sum / count if count else math.nan,
        "count": count,
    }
    return metrics, steps, samples


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: DataLoader[Any] | None, device: torch.device
) -> dict[str, float]:
    """Metrics over the whole split: every rank's predictions, gathered, de-duplicated."""
    parts: list[np.ndarray] = []
    if loader is not None:
        model.eval()
        criterion = torch.nn.BCEWithLogitsLoss(reduction="none")
        for batch in loader:
            batch = normalize_on_device(batch, device)
            with autocast(device):
                logits = model(batch["image"]).squeeze(1)
            labels = batch["label"]
            losses = criterion(logits.float(), labels)
            parts.append(
                torch.stack(
                    [
                        batch["sample"].to(device).double(),
                        labels.double(),
                        torch.sigmoid(logits.float()).double(),
                        losses.double(),
                    ]
                )
                .cpu()
                .numpy()
            )
    local = np.concatenate(parts, axis=1) if parts else np.zeros((4, 0))
    rows = np.concatenate(_dist.all_gather_objects(local), axis=1)
    # Padding repeats a few samples on some ranks: keep each sample once.
    _, first = np.unique(rows[0], return_index=True)
    rows = rows[:, first]
    return binary_metrics(rows[1], rows[2], rows[3])


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False))
    os.replace(tmp, path)


def load_selection(
    config: TrainConfig, selection: pd.DataFrame | None, version: int | None
) -> tuple[pd.DataFrame, int | None]:
    """The selection (given, from parquet, or from the catalog), sorted by ``volume_id``."""
    import pandas as pd

    if selection is not None:
        frame = selection
    elif config.selection is not None:
        frame = pd.read_parquet(config.selection)
    else:
        if config.catalog is None:
            raise ConfigError("no catalog URL and no selection given", hint="pass --catalog")
        from voxlake.catalog import open_catalog

        # Rank 0 pins the version first; the others read exactly that version.
        version = _dist.broadcast_object(
            open_catalog(
                config.catalog, version=version, storage_options=config.storage_options
            ).version
            if World.detect().is_main
            else None
        )
        catalog = open_catalog(
            config.catalog, version=version, storage_options=config.storage_options
        )
        frame = catalog.training_selection(config.label, split=config.split)
        version = int(catalog.version)
    # One order on every rank, whatever order the table files were read in.
    return frame.sort_values("volume_id", kind="mergesort").reset_index(drop=True), version


def make_stream(
    config: TrainConfig,
    frame: pd.DataFrame,
    version: int | None,
    *,
    shuffle: bool,
    output: Literal["float32", "stored"],
) -> VolumeStream | None:
    """A stream over ``frame`` delivering ``output`` images (None when ``frame`` is empty);
    ``output`` is ``config.output`` as :func:`resolve_output` decided it."""
    if len(frame) == 0:
        return None
    return VolumeStream(
        frame,
        config.store,
        shape=config.shape,
        mode=config.mode,
        patch_size=config.patch_size,
        patches_per_volume=config.patches_per_volume,
        sampler=config.sampler,
        cache_bytes=config.cache_bytes,
        label_column=config.label,
        seed=config.seed,
        shuffle=shuffle,
        prefetch=config.prefetch,
        storage_options=config.storage_options,
        catalog_version=version,
        batch_size=config.batch_size,
        output=output,
    )


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` with :func:`torch.save` to a temporary file, then rename it."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def save_training_state(
    path: Path,
    device: torch.device,
    *,
    progress: EpochProgress | None,
    stream: VolumeStream,
    samples: int,
    state: dict[str, Any],
) -> None:
    """Checkpoint a run; every rank must call it (RNG states are gathered, then a barrier).

    ``state`` holds what rank 0 writes as is (model, optimizer, ``epoch``: the last
    completed epoch, history, ...). ``progress`` is set for a mid-epoch checkpoint: the
    epoch ``state["epoch"] + 1`` is then resumed after its first ``progress.steps`` steps,
    with every rank's running totals restored.
    """
    rng = _dist.all_gather_objects(_dist.rng_state(device))
    partial = None
    if progress is not None:
        partial = {
            "steps": progress.steps,
            "samples": progress.samples,
            "totals": _dist.all_gather_objects(progress.totals),
        }
    if World.detect().is_main:
        stream_state = stream.state_dict(samples_yielded=samples)
        save_checkpoint(path, {**state, "stream": stream_state, "rng": rng, "partial": partial})
    # When this returns the checkpoint is on disk for every rank: a rank that stops right
    # after (preemption) and restarts in the same process reads the same file as rank 0.
    _dist.barrier()


def resume_point(checkpoint: dict[str, Any], rank: int) -> tuple[int, EpochProgress | None]:
    """First epoch to train after ``checkpoint`` and, mid-epoch, this rank's progress in it."""
    partial = checkpoint.get("partial")
    if not partial:
        return int(checkpoint["epoch"]) + 1, None
    totals = [float(v) for v in partial["totals"][rank]]
    return int(checkpoint["epoch"]) + 1, EpochProgress(
        int(partial["steps"]), int(partial["samples"]), totals
    )


def load_checkpoint(path: Path, version: int | None) -> tuple[dict[str, Any], int | None]:
    """The checkpoint to resume from and the catalog version to read (the checkpoint's)."""
    if not path.exists():
        raise ConfigError(f"cannot resume: no checkpoint at {path}")
    checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    saved = checkpoint.get("catalog_version")
    if version is not None and saved is not None and int(saved) != version:
        raise ConfigError(f"checkpoint was trained on catalog version {saved}, not {version}")
    return checkpoint, saved if version is None else version
