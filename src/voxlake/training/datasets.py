"""``VolumeStream``: a torch ``IterableDataset`` over a catalog selection of stored volumes.

Contract
--------
- An epoch has ``num_samples`` samples: one per volume (``mode="volume"``) or
  ``patches_per_volume`` random patches per volume (``mode="patch"``; sample ``s`` is a
  patch of volume ``s // patches_per_volume``). Which samples a (rank, worker) reads is
  :func:`voxlake.training.partition_samples` of (seed, epoch, world size, rank, worker):
  every rank gets ``len(stream)`` samples, so DDP ranks run the same number of steps.
- A patch's origin and a sample's augmentation are drawn from (seed, epoch, sample)
  alone (:mod:`voxlake.training.patches`): the same for any worker count and on resume.
  A patch reads exactly ``array[z0:z0+d, y0:y0+h, x0:x0+w]``, i.e. only the chunks it
  touches.
- Stores are opened lazily inside the process that iterates (DataLoader worker) and
  cached per process id: an open store or fsspec filesystem is never shared across a
  fork, and the stream pickles without one (spawn / forkserver workers). Reads retry
  transient errors; an optional per-process chunk cache is capped in bytes.
- Samples are read by a thread pool ``prefetch`` samples ahead, in order, which hides
  object-storage latency.
- Samples are dictionaries (MONAI dictionary transforms accept them)::

      {"image": FloatTensor (C, D, H, W), "label": float32 scalar tensor,
       "volume_id": str, "index": int, "sample": int, "origin": LongTensor (3,)}

  With ``output="stored"`` the image keeps the stored dtype (int16 for CT), unnormalised,
  and two entries more say how to normalise it: ``"normalization"``, float32
  ``(shift, scale, low, high)``, and in patch mode ``"valid"``, LongTensor (3, 2), the
  start/stop along z, y, x of the voxels read (the rest is padding).
  :func:`voxlake.training.normalize_on_device` then gives the float32 images, bit for
  bit, on the device.

  ``index`` is the row position in the selection, ``sample`` the sample number in the
  epoch (equal to ``index`` in volume mode); ``label`` is absent when ``label_column``
  is None and ``origin`` (the patch's first voxel) only in patch mode. ``C`` is 1, or
  the length of the volume's channel axis when its OME axes have one (``c, z, y, x``,
  e.g. RGB): patches are then cut at the same (z, y, x) box across all channels.
- Stored arrays are read by :class:`voxlake.volumes.sharded.ShardedReader` (the
  writer's sharded layout) or zarr (anything else), with identical results; chunks are
  normalised as they are decoded, into an image allocated in shared memory inside a
  DataLoader worker (see :func:`voxlake.training.collate_samples`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset

from voxlake.training._reader import ReadOptions, VolumeReader, prefetched, read_stream_sample
from voxlake.training.partition import partition_samples, samples_per_rank
from voxlake.training.patches import Sampler
from voxlake.training.transforms import Augmentation
from voxlake.training.world import World

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd

__all__ = ["VolumeStream"]

logger = logging.getLogger(__name__)

Normalize = Literal["zscore", "ct_window", "none"]
Output = Literal["float32", "stored"]


def _float_column(selection: pd.DataFrame, name: str) -> np.ndarray:
    if name not in selection.columns:
        return np.full(len(selection), np.nan)
    return np.asarray(selection[name].to_numpy(dtype=np.float64, na_value=np.nan))


def _size3(value: tuple[int, int, int] | list[int], what: str) -> tuple[int, int, int]:
    if len(value) != 3 or any(int(n) < 1 for n in value):
        raise ValueError(f"{what} must be three positive sizes, got {value}")
    return int(value[0]), int(value[1]), int(value[2])


class VolumeStream(IterableDataset[dict[str, Any]]):
    """Stream whole volumes or random patches of a selection across ranks and workers.

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
        Volume mode: (D, H, W) every volume is trilinearly resized to
        (``align_corners=False``). Unused in patch mode.
    label_column
        Float column holding the label, or None for unlabelled streams. Missing values
        are refused.
    seed
        Seed of the per-epoch order, patch positions and augmentation.
    shuffle
        Shuffle each epoch (identity order otherwise).
    normalize
        ``"zscore"``: ``(x - intensity_mean) / intensity_std`` with the catalog's
        statistics of the stored volume; when missing, the writer's statistics in the
        group attributes (patch mode) or the volume's own (volume mode). ``"ct_window"``:
        HU window ``window`` = (center, width) mapped to [0, 1]. ``"none"``: raw values.
    window
        CT window for ``normalize="ct_window"`` (default soft tissue, 40 / 400 HU).
    prefetch
        Samples read ahead by background threads (0: read in the iterating thread).
    storage_options
        fsspec options for remote stores.
    catalog_version
        Catalog version the selection was read from, recorded for provenance; defaults
        to ``selection.attrs["catalog_version"]`` when present.
    batch_size
        The DataLoader's batch size. Workers receive the rank's samples in blocks of this
        size, so the DataLoader's round-robin over workers delivers the rank's list in
        order; this is what makes mid-epoch resume exact with ``num_workers > 0``.
    mode
        ``"volume"`` (whole volumes, resized to ``shape``) or ``"patch"`` (random
        ``patch_size`` boxes, not resized; padded with 0 after normalisation where the
        volume is smaller than the patch).
    patch_size
        (D, H, W) of a patch.
    patches_per_volume
        Patches drawn from each volume per epoch (patch mode).
    sampler
        ``"uniform"`` or ``"foreground"`` (centred on points of the volume's stored
        class-location index with probability ``foreground_prob``; uniform, with one
        warning per process, for volumes without an index). See
        :func:`voxlake.training.patches.patch_origin`.
    foreground_prob
        Share of foreground-centred patches.
    augment
        Random flips / small affine applied to each sample (reproducible per sample).
    transform
        Called last on each sample dictionary, in the reading thread (e.g. a MONAI
        ``Compose`` of dictionary transforms). Must be picklable for worker processes.
    retries
        Read attempts on transient store errors (1 disables retrying).
    cache_bytes
        Per-process cap of a local in-memory chunk cache (0 disables it); useful when
        patches of the same volumes are read again, e.g. over epochs from object storage.
    wrap_store
        Optional callable applied to each raw store first (instrumentation, e.g.
        :class:`voxlake.volumes.counting.CountingStore`).
    lean
        Read the writer's sharded layout with :class:`voxlake.volumes.sharded.
        ShardedReader` (ranged fetches, decoding on ``decode_threads`` threads straight
        into the normalised output); False reads every array through zarr. Both give
        identical samples.
    decode_threads
        Chunk-decoding threads per process on the lean path.
    output
        ``"float32"``: normalised float32 images. ``"stored"``: the stored dtype,
        unnormalised, with each sample's ``normalization`` parameters (and ``valid`` box
        in patch mode), for :func:`voxlake.training.normalize_on_device` to normalise on
        the GPU: half the bytes (int16) to write, send between processes, pin and copy.
        Flips work on stored values (they commute with the normalisation); the affine
        augmentation needs float32 images and is refused (apply
        :func:`voxlake.training.random_affine` after ``normalize_on_device``), and so is
        resizing in volume mode (``shape`` must be the stored size). A ``transform`` sees
        the stored-dtype image.
    reuse_buffers
        Image buffers each process keeps to reuse (0, the default: a fresh image per
        sample). A kept buffer is written again only once nothing refers to its image any
        more (no tensor, view, storage or numpy view of it is alive, checked by reference
        count), so a sample's image is never overwritten while it can still be reached:
        there is no validity window to respect. It saves faulting in and zeroing fresh
        pages for every sample when images are released promptly, e.g. in the main
        process (``num_workers=0``) or in workers batching several samples (whose
        private images the collate copies). Images a worker writes into shared memory
        are never pooled. Costs up to ``reuse_buffers`` images of memory per process;
        ``prefetch + 3`` covers a loop holding one batch at a time in the main process.

    Notes
    -----
    4D (t, z, y, x) volumes are streamed as their first time point (``t = 0``); the axes
    are read from the group's OME ``multiscales`` metadata (by rank when it is absent).
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
        normalize: Normalize = "zscore",
        window: tuple[float, float] = (40.0, 400.0),
        prefetch: int = 2,
        storage_options: dict[str, Any] | None = None,
        catalog_version: int | None = None,
        batch_size: int = 1,
        mode: Literal["volume", "patch"] = "volume",
        patch_size: tuple[int, int, int] = (96, 96, 96),
        patches_per_volume: int = 1,
        sampler: Sampler = "uniform",
        foreground_prob: float = 0.5,
        augment: Augmentation | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        retries: int = 5,
        cache_bytes: int = 0,
        wrap_store: Callable[[Any], Any] | None = None,
        lean: bool = True,
        decode_threads: int = 2,
        output: Output = "float32",
        reuse_buffers: int = 0,
    ) -> None:
        super().__init__()
        # Epoch, seed and resume point live in shared memory: DataLoader workers (forked,
        # or spawned through torch's pickler) see set_epoch() and load_state_dict() made
        # later in the main process, so persistent_workers=True follows every epoch.
        self._shared = torch.tensor([0, 0, 0, -1, -1], dtype=torch.int64).share_memory_()
        if len(selection) == 0:
            raise ValueError("the selection is empty: nothing to stream")
        needed = ["volume_id", "store_path"] + ([] if store is not None else ["store_url"])
        if label_column is not None:
            needed.append(label_column)
        missing = [name for name in needed if name not in selection.columns]
        if missing:
            raise ValueError(f"selection lacks columns: {', '.join(missing)}")
        if normalize not in ("zscore", "ct_window", "none"):
            raise ValueError(f"normalize must be zscore, ct_window or none, not {normalize!r}")
        if mode not in ("volume", "patch") or sampler not in ("uniform", "foreground"):
            raise ValueError(f"unknown mode {mode!r} or sampler {sampler!r}")
        if prefetch < 0 or batch_size < 1 or patches_per_volume < 1 or retries < 1:
            raise ValueError(
                "prefetch must be >= 0; batch_size, patches_per_volume and retries >= 1"
            )
        if not 0.0 <= foreground_prob <= 1.0 or cache_bytes < 0 or window[1] <= 0:
            raise ValueError("need 0 <= foreground_prob <= 1, cache_bytes >= 0, window width > 0")

        if output not in ("float32", "stored"):
            raise ValueError(f"output must be float32 or stored, not {output!r}")
        if output == "stored" and augment is not None and augment.affine_prob > 0:
            raise ValueError(
                "output='stored' delivers unnormalised integer images: the affine "
                "augmentation needs float32 ones (use output='float32', or apply "
                "random_affine after normalize_on_device)"
            )
        self.output: Output = output
        self.shape = _size3(shape, "shape")
        self.patch_size = _size3(patch_size, "patch_size")
        self.mode = mode
        self.patches_per_volume = int(patches_per_volume) if mode == "patch" else 1
        self.sampler: Sampler = sampler
        self.foreground_prob = float(foreground_prob)
        self.label_column = label_column
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.normalize: Normalize = normalize
        self.window = (float(window[0]), float(window[1]))
        self.prefetch = int(prefetch)
        self.augment = augment
        self.transform = transform
        self.storage_options = dict(storage_options) if storage_options else None
        if decode_threads < 1:
            raise ValueError(f"decode_threads must be >= 1, got {decode_threads}")
        if reuse_buffers < 0:
            raise ValueError(f"reuse_buffers must be >= 0, got {reuse_buffers}")
        self._options = ReadOptions(
            self.storage_options,
            int(retries),
            int(cache_bytes),
            wrap_store,
            lean=bool(lean),
            decode_threads=int(decode_threads),
            reuse_buffers=int(reuse_buffers),
        )
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

        self._yielded = 0
        self._world_hint: tuple[int, int] | None = None
        self._reader: VolumeReader | None = None

    # -- state shared with DataLoader workers ----------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch the next iteration follows (see :meth:`set_epoch`)."""
        return int(self._shared[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._shared[0] = int(value)

    @property
    def seed(self) -> int:
        """Seed of the order, patch positions and augmentation."""
        return int(self._shared[1])

    @seed.setter
    def seed(self, value: int) -> None:
        self._shared[1] = int(value)

    @property
    def _skip(self) -> int:
        return int(self._shared[2])

    @_skip.setter
    def _skip(self, value: int) -> None:
        self._shared[2] = int(value)

    @property
    def _skip_epoch(self) -> int:
        return int(self._shared[3])

    @_skip_epoch.setter
    def _skip_epoch(self, value: int) -> None:
        self._shared[3] = int(value)

    @property
    def _saved_world_size(self) -> int | None:
        value = int(self._shared[4])
        return None if value < 0 else value

    @_saved_world_size.setter
    def _saved_world_size(self, value: int | None) -> None:
        self._shared[4] = -1 if value is None else int(value)

    # -- sizes and state -------------------------------------------------------------------

    @property
    def num_volumes(self) -> int:
        """Rows of the selection."""
        return len(self._paths)

    @property
    def num_samples(self) -> int:
        """Samples per epoch before padding: volumes x ``patches_per_volume``."""
        return len(self._paths) * self.patches_per_volume

    @property
    def volume_ids(self) -> list[str]:
        """Volume ids in selection order (``sample["index"]`` indexes this list)."""
        return list(self._volume_ids)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (padding included), for the current world."""
        return samples_per_rank(self.num_samples, self._world().world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows.

        Call it before creating the DataLoader iterator of each epoch. The epoch is kept
        in shared memory, so persistent DataLoader workers (``persistent_workers=True``,
        which spares each epoch the start of new worker processes) follow it too. A
        resume point loaded for another epoch is discarded.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        if epoch != self.epoch:
            self._yielded = 0
        if epoch != self._skip_epoch:
            self._skip, self._skip_epoch = 0, -1
        self.epoch = int(epoch)

    def state_dict(self, samples_yielded: int | None = None) -> dict[str, Any]:
        """Resume point of this rank (a few hundred bytes, whatever the selection size).

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
            ``epoch``, ``seed``, ``samples_yielded`` (per rank), ``num_samples``,
            ``world_size``, ``mode``, ``patches_per_volume`` and ``catalog_version``.
        """
        count = self._yielded if samples_yielded is None else int(samples_yielded)
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "samples_yielded": count,
            "num_samples": self.num_samples,
            "world_size": self._world().world_size,
            "mode": self.mode,
            "patches_per_volume": self.patches_per_volume,
            "catalog_version": self.catalog_version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next iteration of ``state["epoch"]`` skips
        the samples this rank already delivered.

        Raises
        ------
        ValueError
            If the state describes another number of samples or another mode (another
            selection, catalog version or patch setting).
        """
        if int(state["num_samples"]) != self.num_samples or state.get("mode", self.mode) != (
            self.mode
        ):
            raise ValueError(
                f"state is for {state['num_samples']} samples ({state.get('mode')} mode), "
                f"this stream has {self.num_samples} ({self.mode} mode): resume with the "
                "same catalog version, selection and patch settings"
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
        state["_reader"] = None  # never ship open stores/filesystems to another process
        parent = self._world()
        state["_world_hint"] = (parent.rank, parent.world_size)
        return state

    def _process_reader(self) -> VolumeReader:
        reader = self._reader
        if reader is None or reader.pid != os.getpid():
            reader = self._reader = VolumeReader(self._store_urls, self._options)
        return reader

    def indices(self, world: World | None = None) -> np.ndarray:
        """Samples the given (default: detected) rank and worker read this epoch."""
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
        samples = [int(i) for i in self.indices()]
        self._yielded = self._skip if self._skip_epoch == self.epoch else 0
        reader = self._process_reader()
        for item in prefetched(lambda i: self.read_sample(i, reader), samples, self.prefetch):
            self._yielded += 1
            yield item

    def read_sample(self, sample: int, reader: VolumeReader | None = None) -> dict[str, Any]:
        """Read sample number ``sample`` of the current epoch (what iteration yields)."""
        return read_stream_sample(self, sample, reader or self._process_reader())
