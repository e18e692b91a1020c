"""``VolumeStream``: a torch ``IterableDataset`` over a catalog selection of stored volumes.

Contract
--------
- Which samples a (rank, worker) reads is :func:`voxlake.training.partition_samples` of
  (seed, epoch, world size, rank, worker): every rank gets ``len(stream)`` samples, so
  DDP ranks run the same number of steps.
- Stores are opened lazily inside the process that iterates (DataLoader worker) and
  cached per process id: an open store or fsspec filesystem is never shared across a
  fork, and the stream pickles without one (spawn / forkserver workers).
- Volumes are read by a thread pool ``prefetch`` volumes ahead, in order, which hides
  object-storage latency.
- Samples are dictionaries (MONAI dictionary transforms accept them)::

      {"image": FloatTensor (1, D, H, W), "label": float32 scalar tensor,
       "volume_id": str, "index": int}

  ``index`` is the row position in the selection; ``label`` is absent when
  ``label_column`` is None.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset

from voxlake.training.partition import partition_samples, samples_per_rank
from voxlake.training.transforms import resize, zscore
from voxlake.training.world import World

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd

__all__ = ["VolumeStream"]

logger = logging.getLogger(__name__)


def _float_column(selection: pd.DataFrame, name: str) -> np.ndarray:
    if name not in selection.columns:
        return np.full(len(selection), np.nan)
    return np.asarray(selection[name].to_numpy(dtype=np.float64, na_value=np.nan))


class VolumeStream(IterableDataset[dict[str, Any]]):
    """Stream the volumes of a selection, resized and normalised, across ranks and workers.

    Parameters
    ----------
    selection
        One row per volume; columns used: ``volume_id``, ``store_path`` (group path inside
        the store), ``store_url`` (only when ``store`` is None), ``intensity_mean`` and
        ``intensity_std`` (optional, for z-scoring) and ``label_column``. Only these
        columns are kept, as arrays and lists; the DataFrame is not retained.
    store
        Volume store URL for every row; defaults to each row's ``store_url``.
    shape
        (D, H, W) every volume is trilinearly resized to (``align_corners=False``).
    label_column
        Float column holding the label, or None for unlabelled streams. Missing values
        are refused.
    seed
        Seed of the per-epoch order.
    shuffle
        Shuffle each epoch (identity order otherwise).
    normalize
        ``"zscore"``: ``(x - intensity_mean) / intensity_std`` using the catalog's
        statistics of the stored volume, or the volume's own when they are missing or
        NaN; ``"none"``: raw values as float32.
    prefetch
        Volumes read ahead by background threads (0: read in the iterating thread).
    storage_options
        fsspec options for remote stores.
    catalog_version
        Catalog version the selection was read from, recorded for provenance; defaults
        to ``selection.attrs["catalog_version"]`` when present.
    batch_size
        The DataLoader's batch size. Workers receive the rank's samples in blocks of this
        size, so the DataLoader's round-robin over workers delivers the rank's list in
        order; this is what makes mid-epoch resume exact with ``num_workers > 0``.

    Notes
    -----
    4D (t, z, y, x) volumes are streamed as their first time point (``t = 0``); the
    catalog statistics then describe all time points, a close approximation.
    """

    def __init__(
        self,
        selection: pd.DataFrame,
        store: str | os.PathLike[str] | None = None,
        *,
        shape: tuple[int, int, int] = (64, 64, 64),
        label_column: str | None = "label",
        seed: int = 0,
        shuffle: bool = True,
        normalize: Literal["zscore", "none"] = "zscore",
        prefetch: int = 2,
        storage_options: dict[str, Any] | None = None,
        catalog_version: int | None = None,
        batch_size: int = 1,
    ) -> None:
        super().__init__()
        if len(selection) == 0:
            raise ValueError("the selection is empty: nothing to stream")
        needed = ["volume_id", "store_path"] + ([] if store is not None else ["store_url"])
        if label_column is not None:
            needed.append(label_column)
        missing = [name for name in needed if name not in selection.columns]
        if missing:
            raise ValueError(f"selection lacks columns: {', '.join(missing)}")
        if normalize not in ("zscore", "none"):
            raise ValueError(f"normalize must be 'zscore' or 'none', not {normalize!r}")
        if len(shape) != 3 or any(int(n) < 1 for n in shape):
            raise ValueError(f"shape must be three positive sizes, got {shape}")
        if prefetch < 0 or batch_size < 1:
            raise ValueError("prefetch must be >= 0 and batch_size >= 1")

        self.shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.label_column = label_column
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.normalize = normalize
        self.prefetch = int(prefetch)
        self.storage_options = dict(storage_options) if storage_options else None
        if catalog_version is None:
            # Catalog.training_selection() records the version it read in DataFrame.attrs.
            catalog_version = selection.attrs.get("catalog_version")
        self.catalog_version = catalog_version
        self.batch_size = int(batch_size)
        self.epoch = 0

        self._volume_ids = [str(v) for v in selection["volume_id"]]
        self._paths = [str(p) for p in selection["store_path"]]
        urls = (
            [os.fspath(store)] * len(selection)
            if store is not None
            else [str(u) for u in selection["store_url"]]
        )
        self._store_urls = sorted(set(urls))
        code = {url: i for i, url in enumerate(self._store_urls)}
        self._store_codes = np.asarray([code[u] for u in urls], dtype=np.int32)
        self._means = _float_column(selection, "intensity_mean")
        self._stds = _float_column(selection, "intensity_std")
        self._labels: np.ndarray | None = None
        if label_column is not None:
            labels = _float_column(selection, label_column).astype(np.float32)
            if np.isnan(labels).any():
                raise ValueError(f"label column {label_column!r} has missing values")
            self._labels = labels

        self._skip = 0
        self._skip_epoch = -1
        self._saved_world_size: int | None = None
        self._yielded = 0
        self._world_hint: tuple[int, int] | None = None
        self._stores: dict[str, Any] = {}
        self._stores_pid = os.getpid()

    # -- sizes and state -------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """Rows of the selection."""
        return len(self._paths)

    @property
    def volume_ids(self) -> list[str]:
        """Volume ids in selection order (``sample["index"]`` indexes this list)."""
        return list(self._volume_ids)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (padding included), for the current world."""
        return samples_per_rank(self.num_samples, self._world().world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows.

        Call it before creating the DataLoader iterator of each epoch (workers copy the
        stream when the iterator starts). A resume point loaded for another epoch is
        discarded.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        if epoch != self.epoch:
            self._yielded = 0
        if epoch != self._skip_epoch:
            self._skip, self._skip_epoch = 0, -1
        self.epoch = int(epoch)

    def state_dict(self, samples_yielded: int | None = None) -> dict[str, Any]:
        """Resume point of this rank.

        Parameters
        ----------
        samples_yielded
            Samples of the current epoch this rank has consumed. Defaults to what this
            object yielded itself, which is exact when the DataLoader uses
            ``num_workers=0``; with worker processes pass the count of samples taken from
            the DataLoader (e.g. the sum of ``len(batch["index"])``).

        Returns
        -------
        dict
            ``epoch``, ``seed``, ``samples_yielded`` (per rank), ``num_samples`` and
            ``world_size``.
        """
        count = self._yielded if samples_yielded is None else int(samples_yielded)
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "samples_yielded": count,
            "num_samples": self.num_samples,
            "world_size": self._world().world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next iteration of ``state["epoch"]`` skips
        the samples this rank already delivered.

        Raises
        ------
        ValueError
            If the state describes a different number of samples (another selection).
        """
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"state is for {state['num_samples']} samples, this stream has "
                f"{self.num_samples}: resume with the same catalog version and selection"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self._skip = int(state["samples_yielded"])
        self._skip_epoch = self.epoch
        self._yielded = self._skip
        world_size = state.get("world_size")
        self._saved_world_size = int(world_size) if world_size is not None else None

    # -- iteration -------------------------------------------------------------------------

    def _world(self) -> World:
        world = World.detect()
        hint = self._world_hint
        if world.world_size == 1 and hint is not None and hint[1] > 1:
            # A spawn/forkserver worker does not inherit the process group: use the
            # coordinates its parent recorded when pickling the stream.
            return World(
                rank=hint[0],
                world_size=hint[1],
                worker_id=world.worker_id,
                num_workers=world.num_workers,
            )
        return world

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stores"] = {}  # never ship open stores/filesystems to another process
        parent = self._world()
        state["_world_hint"] = (parent.rank, parent.world_size)
        return state

    def _store(self, url: str) -> Any:
        from voxlake.volumes import open_store

        if self._stores_pid != os.getpid():
            self._stores, self._stores_pid = {}, os.getpid()
        if url not in self._stores:
            self._stores[url] = open_store(
                url, storage_options=self.storage_options, read_only=True
            )
        return self._stores[url]

    def indices(self, world: World | None = None) -> np.ndarray:
        """Selection rows the given (default: detected) rank and worker read this epoch."""
        world = world or self._world()
        skip = self._skip if self._skip_epoch == self.epoch else 0
        if skip and self._saved_world_size not in (None, world.world_size):
            raise ValueError(
                f"resume state was saved with world size {self._saved_world_size}, "
                f"now {world.world_size}: mid-epoch resume needs the same world size"
            )
        return partition_samples(
            self.num_samples,
            seed=self.seed,
            epoch=self.epoch,
            world_size=world.world_size,
            rank=world.rank,
            num_workers=world.num_workers,
            worker_id=world.worker_id,
            shuffle=self.shuffle,
            skip=skip,
            block_size=self.batch_size,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        indices = [int(i) for i in self.indices()]
        self._yielded = self._skip if self._skip_epoch == self.epoch else 0
        stores = {
            code: self._store(self._store_urls[code])
            for code in {int(self._store_codes[i]) for i in indices}
        }
        if self.prefetch == 0:
            for index in indices:
                sample = self._read(index, stores)
                self._yielded += 1
                yield sample
            return
        pool = ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="voxlake-read")
        pending: deque[Future[dict[str, Any]]] = deque()
        upcoming = iter(indices)
        try:
            for index in upcoming:
                pending.append(pool.submit(self._read, index, stores))
                if len(pending) > self.prefetch:
                    break
            while pending:
                sample = pending.popleft().result()
                following = next(upcoming, None)
                if following is not None:
                    pending.append(pool.submit(self._read, following, stores))
                self._yielded += 1
                yield sample
        finally:
            # An early stop (break, error) must not wait for reads nobody will consume.
            pool.shutdown(wait=False, cancel_futures=True)

    def _read(self, index: int, stores: dict[int, Any]) -> dict[str, Any]:
        from voxlake.volumes import open_volume

        array = open_volume(stores[int(self._store_codes[index])], self._paths[index])
        data = np.asarray(array[0] if array.ndim == 4 else array[...])
        volume = torch.from_numpy(data.astype(np.float32, copy=False))
        if self.normalize == "zscore":
            mean, std = float(self._means[index]), float(self._stds[index])
            if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
                stats = data.astype(np.float64, copy=False)
                mean, std = float(stats.mean()), float(stats.std())
            volume = zscore(volume, mean, std)
        sample: dict[str, Any] = {
            "image": resize(volume.unsqueeze(0), self.shape).contiguous(),
            "volume_id": self._volume_ids[index],
            "index": index,
        }
        if self._labels is not None:
            sample["label"] = torch.tensor(self._labels[index], dtype=torch.float32)
        return sample
