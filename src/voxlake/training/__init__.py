"""Stream stored volumes into PyTorch training: partitioning, datasets, models, DDP runs.

Nothing here imports ingest, dask, distributed or pydicom, so a GPU node needs only
torch, zarr, numpy and pandas. The catalog is opened lazily by :func:`run_training`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    import torch  # noqa: F401  (the train extra)
except ModuleNotFoundError as exc:
    if exc.name != "torch":
        raise
    from voxlake.errors import MissingExtraError

    raise MissingExtraError(
        "voxlake.training needs PyTorch, which is not installed",
        hint="install torch first (pip install torch==2.13.0 for the CPU build, or the "
        "CUDA build your cluster uses), then pip install 'voxlake[train]'",
    ) from exc

from voxlake.training.collate import collate_samples
from voxlake.training.datasets import VolumeStream
from voxlake.training.device import normalize_on_device
from voxlake.training.metrics import binary_metrics, roc_auc
from voxlake.training.models import CNN3D
from voxlake.training.partition import global_order, partition_samples, samples_per_rank
from voxlake.training.patches import patch_origin
from voxlake.training.split import assign_split, split_frame
from voxlake.training.transforms import (
    Augmentation,
    augment,
    ct_window,
    random_affine,
    random_flip,
    resize,
    zscore,
)
from voxlake.training.world import World

if TYPE_CHECKING:
    from voxlake.training.train import TrainConfig, TrainReport, launch, run_training

__all__ = [
    "CNN3D",
    "Augmentation",
    "TrainConfig",
    "TrainReport",
    "VolumeStream",
    "World",
    "assign_split",
    "augment",
    "binary_metrics",
    "collate_samples",
    "ct_window",
    "global_order",
    "launch",
    "normalize_on_device",
    "partition_samples",
    "patch_origin",
    "random_affine",
    "random_flip",
    "resize",
    "roc_auc",
    "run_training",
    "samples_per_rank",
    "split_frame",
    "zscore",
]

_TRAIN_NAMES = frozenset({"TrainConfig", "TrainReport", "launch", "run_training"})


def __getattr__(name: str) -> Any:
    # Lazy, so that ``python -m voxlake.training.train`` (torchrun) does not find the module
    # already imported by its package and warn about running it twice.
    if name in _TRAIN_NAMES:
        from voxlake.training import train

        return getattr(train, name)
    raise AttributeError(f"module 'voxlake.training' has no attribute {name!r}")
