"""Options and outcome of a training run (re-exported by :mod:`voxlake.training.train`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from voxlake.errors import ConfigError

__all__ = ["TrainConfig", "TrainReport"]


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
        Train / validation / test shares of patients (when no saved split is used).
    split
        Name of a split saved in the catalog (``voxlake catalog split``); its assignment
        is used as is. None: split by hashing ``patient_key`` with ``fractions``.
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
    mode, patch_size, patches_per_volume, sampler
        ``"volume"``: whole volumes resized to ``shape``; ``"patch"``: random
        ``patch_size`` patches (the model's input), ``patches_per_volume`` per volume and
        epoch, ``"uniform"`` or ``"foreground"`` sampled (see ``VolumeStream``).
    cache_bytes
        Per-worker chunk cache cap (0: none).
    checkpoint_every_steps
        Also checkpoint every this many steps within an epoch (with the stream position),
        so a killed run resumes mid-epoch exactly; None: at epoch ends only.
    output
        ``"float32"``: the loader delivers normalised float32 images. ``"stored"``: it
        delivers the stored dtype (int16 for CT, half the bytes) and each batch is
        normalised on the training device by :func:`voxlake.training.normalize_on_device`
        (same values, bit for bit). Needs volumes stored at ``shape`` in volume mode (no
        resizing); see ``VolumeStream(output=...)``. ``"auto"`` (default): ``"stored"``
        on a CUDA device in patch mode (patches are never resized; on an H100 it cut the
        tutorial CNN's data stall from 46% to 5%, docs/performance.md), ``"float32"``
        otherwise (on CPU the normalisation would only move from the loader's workers to
        the training process).
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
    split: str | None = None
    catalog_version: int | None = None
    storage_options: dict[str, Any] | None = None
    resume: bool = False
    max_steps_per_epoch: int | None = None
    prefetch: int = 2
    selection: str | None = None
    mode: Literal["volume", "patch"] = "volume"
    patch_size: tuple[int, int, int] = (96, 96, 96)
    patches_per_volume: int = 1
    sampler: Literal["uniform", "foreground"] = "uniform"
    cache_bytes: int = 0
    checkpoint_every_steps: int | None = None
    output: Literal["auto", "float32", "stored"] = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("epochs and batch_size must be >= 1, num_workers >= 0")
        for name in ("max_steps_per_epoch", "checkpoint_every_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 when given")
        if self.mode not in ("volume", "patch") or self.patches_per_volume < 1:
            raise ConfigError("mode must be volume or patch, patches_per_volume >= 1")
        if self.output not in ("auto", "float32", "stored"):
            raise ConfigError(f"output must be auto, float32 or stored, not {self.output!r}")
        for name in ("shape", "patch_size"):
            value = tuple(getattr(self, name))
            if len(value) != 3 or min(value) < 1:
                raise ConfigError(
                    f"{name} must be three sizes of at least 1 (D H W), not {value}",
                    hint=f"e.g. --{name.replace('_', '-')} 32 64 64",
                )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(D, H, W) of the model's inputs: ``shape`` or, in patch mode, ``patch_size``."""
        return self.patch_size if self.mode == "patch" else self.shape


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
