"""Which samples a (rank, worker) reads: a pure function of the job's coordinates.

The global order of an epoch is a seeded permutation of ``range(num_samples)``, padded by
wrapping around so that every rank gets the same number of samples (DDP ranks must run
the same number of steps or the gradient all-reduce hangs). Ranks take interleaved slices
of the padded order; a rank's DataLoader workers take interleaved *blocks* of the rank's
list. Nothing depends on the number of workers except which worker reads what, so the
samples a rank delivers are the same for any worker count.
"""

from __future__ import annotations

import numpy as np

__all__ = ["global_order", "partition_samples", "samples_per_rank"]


def _check_count(num_samples: int) -> None:
    if num_samples <= 0:
        raise ValueError(
            f"cannot partition {num_samples} samples: the selection is empty "
            "(check the catalog query, the label column and the split)"
        )


def samples_per_rank(num_samples: int, world_size: int) -> int:
    """Number of samples each rank gets: ``ceil(num_samples / world_size)``.

    Parameters
    ----------
    num_samples
        Samples in the selection (> 0).
    world_size
        Number of ranks (> 0).

    Returns
    -------
    int
        Samples per rank, identical on every rank.
    """
    _check_count(num_samples)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return -(-num_samples // world_size)


def global_order(num_samples: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The epoch's order of all samples before padding and partitioning.

    Parameters
    ----------
    num_samples
        Samples in the selection (> 0).
    seed, epoch
        Non-negative integers; together they seed the permutation.
    shuffle
        When False the order is ``0 .. num_samples - 1`` for every epoch.

    Returns
    -------
    numpy.ndarray
        ``int64`` permutation of ``range(num_samples)``.
    """
    _check_count(num_samples)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed} epoch={epoch}")
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(num_samples).astype(np.int64)


def partition_samples(
    num_samples: int,
    *,
    seed: int,
    epoch: int,
    world_size: int,
    rank: int,
    num_workers: int = 1,
    worker_id: int = 0,
    shuffle: bool = True,
    skip: int = 0,
    block_size: int = 1,
) -> np.ndarray:
    """Indices (into the selection) that one worker of one rank reads this epoch.

    1. ``order = global_order(num_samples, seed=seed, epoch=epoch, shuffle=shuffle)``.
    2. Padding: ``order`` is extended by wrapping around (repeating from its start, as
       many times as needed when ``num_samples < world_size``) to
       ``samples_per_rank * world_size`` entries. At most ``world_size - 1`` samples are
       therefore seen twice per epoch; evaluation code should de-duplicate by index.
    3. Rank ``r`` takes ``padded[r::world_size]``.
    4. The first ``skip`` samples of the rank's list are dropped (mid-epoch resume).
    5. The rest is cut in blocks of ``block_size``; worker ``w`` takes blocks
       ``w, w + num_workers, ...``. With ``block_size`` equal to the DataLoader's batch
       size, each worker batch is one block and the DataLoader's in-order round-robin
       over workers delivers exactly the rank's list in order, for any worker count.

    Parameters
    ----------
    num_samples
        Samples in the selection (> 0).
    seed, epoch
        Seed the order (non-negative).
    world_size, rank
        Data-parallel coordinates.
    num_workers, worker_id
        DataLoader coordinates within the rank.
    shuffle
        Shuffle the global order (identity when False).
    skip
        Samples of this rank's list already delivered (``0 <= skip <= samples_per_rank``).
    block_size
        Consecutive samples given to one worker before moving to the next.

    Returns
    -------
    numpy.ndarray
        ``int64`` indices in delivery order.

    Raises
    ------
    ValueError
        If ``num_samples`` is 0 or a coordinate is out of range.
    """
    per_rank = samples_per_rank(num_samples, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    if num_workers < 1 or not 0 <= worker_id < num_workers:
        raise ValueError(f"worker {worker_id} out of range for {num_workers} workers")
    if not 0 <= skip <= per_rank:
        raise ValueError(f"skip must be in [0, {per_rank}], got {skip}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    order = global_order(num_samples, seed=seed, epoch=epoch, shuffle=shuffle)
    padded = np.resize(order, per_rank * world_size)  # np.resize repeats cyclically
    remaining = padded[rank::world_size][skip:]
    blocks = np.arange(remaining.size) // block_size
    return np.ascontiguousarray(remaining[blocks % num_workers == worker_id])
