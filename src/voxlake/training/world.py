"""Where this process sits in a training job: its rank and its DataLoader worker.

The stream asks this module once per epoch (inside the DataLoader worker that iterates it),
so the answer is always the live one: a process group initialised after the dataset was
built is still seen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["World"]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer") from exc


@dataclass(frozen=True)
class World:
    """Rank and worker coordinates of the current process.

    Attributes
    ----------
    rank
        Rank of this process in the (data-parallel) job, ``0 <= rank < world_size``.
    world_size
        Number of ranks.
    worker_id
        Index of the DataLoader worker running this code (0 in the main process).
    num_workers
        DataLoader workers of this rank (1 when the main process iterates itself).
    """

    rank: int = 0
    world_size: int = 1
    worker_id: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"invalid rank {self.rank} for world size {self.world_size}")
        if self.num_workers < 1 or not 0 <= self.worker_id < self.num_workers:
            raise ValueError(f"invalid worker {self.worker_id} of {self.num_workers} workers")

    @property
    def is_distributed(self) -> bool:
        """True when more than one rank takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes checkpoints and reports)."""
        return self.rank == 0

    @classmethod
    def detect(cls) -> World:
        """Detect the world of the calling process.

        Rank and world size come from :mod:`torch.distributed` when a process group is
        initialised, else from the ``RANK`` / ``WORLD_SIZE`` environment variables that
        ``torchrun`` sets, else ``0`` / ``1``. Worker coordinates come from
        :func:`torch.utils.data.get_worker_info` (``0`` / ``1`` outside a worker).

        Returns
        -------
        World
            The detected coordinates.
        """
        import torch.distributed as dist
        from torch.utils.data import get_worker_info

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        info = get_worker_info()
        if info is None:
            return cls(rank=rank, world_size=world_size)
        return cls(
            rank=rank, world_size=world_size, worker_id=info.id, num_workers=info.num_workers
        )
