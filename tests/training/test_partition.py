from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxlake.training import global_order, partition_samples, samples_per_rank

coords = st.fixed_dictionaries(
    {
        "n": st.integers(1, 200),
        "world_size": st.integers(1, 4),
        "num_workers": st.integers(1, 4),
        "seed": st.integers(0, 2**32 - 1),
        "epoch": st.integers(0, 1000),
        "shuffle": st.booleans(),
        "block_size": st.integers(1, 5),
    }
)


def rank_list(c: dict, rank: int, **extra: int) -> np.ndarray:
    return partition_samples(
        c["n"], seed=c["seed"], epoch=c["epoch"], world_size=c["world_size"], rank=rank,
        shuffle=c["shuffle"], **extra,
    )  # fmt: skip


def worker_lists(c: dict, rank: int, num_workers: int) -> list[np.ndarray]:
    return [
        rank_list(c, rank, num_workers=num_workers, worker_id=w, block_size=c["block_size"])
        for w in range(num_workers)
    ]


@settings(max_examples=200, deadline=None)
@given(coords)
def test_ranks_cover_everything_with_equal_counts(c: dict) -> None:
    n, ws = c["n"], c["world_size"]
    per_rank = samples_per_rank(n, ws)
    lists = [rank_list(c, r) for r in range(ws)]
    assert all(lst.dtype == np.int64 and lst.size == per_rank for lst in lists)
    everything = np.concatenate(lists)
    assert set(everything.tolist()) == set(range(n))
    # Only the wrapped padding repeats samples.
    duplicates = everything.size - np.unique(everything).size
    assert duplicates == per_rank * ws - n


@settings(max_examples=200, deadline=None)
@given(coords)
def test_workers_split_the_rank_list_exactly(c: dict) -> None:
    for rank in range(c["world_size"]):
        ranked = rank_list(c, rank)
        parts = worker_lists(c, rank, c["num_workers"])
        assert sorted(np.concatenate(parts).tolist()) == sorted(ranked.tolist())
        # Round-robin over workers, one block at a time, gives back the rank order.
        b = c["block_size"]
        blocks = [[p[i : i + b] for i in range(0, p.size, b)] for p in parts]
        interleaved = []
        for i in range(max(len(bl) for bl in blocks)):
            interleaved += [bl[i] for bl in blocks if i < len(bl)]
        assert np.concatenate(interleaved).tolist() == ranked.tolist()


@settings(max_examples=100, deadline=None)
@given(coords, st.integers(1, 4))
def test_rank_sequence_does_not_depend_on_worker_count(c: dict, other_workers: int) -> None:
    for rank in range(c["world_size"]):
        a = sorted(np.concatenate(worker_lists(c, rank, c["num_workers"])).tolist())
        b = sorted(np.concatenate(worker_lists(c, rank, other_workers)).tolist())
        assert a == b


@settings(max_examples=100, deadline=None)
@given(coords, st.data())
def test_pure_and_skip_drops_a_prefix(c: dict, data: st.DataObject) -> None:
    rank = data.draw(st.integers(0, c["world_size"] - 1))
    first, second = rank_list(c, rank), rank_list(c, rank)
    assert np.array_equal(first, second)
    skip = data.draw(st.integers(0, first.size))
    assert rank_list(c, rank, skip=skip).tolist() == first[skip:].tolist()


def test_global_order_is_seeded_and_identity_without_shuffle() -> None:
    a = global_order(50, seed=3, epoch=1)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, global_order(50, seed=3, epoch=1))
    assert not np.array_equal(a, global_order(50, seed=3, epoch=2))
    assert global_order(5, seed=3, epoch=1, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_padding_wraps_repeatedly_when_fewer_samples_than_ranks() -> None:
    lists = [
        partition_samples(2, seed=0, epoch=0, world_size=5, rank=r, shuffle=False).tolist()
        for r in range(5)
    ]
    assert lists == [[0], [1], [0], [1], [0]]


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        partition_samples(0, seed=0, epoch=0, world_size=1, rank=0)
    with pytest.raises(ValueError, match="rank"):
        partition_samples(3, seed=0, epoch=0, world_size=2, rank=2)
    with pytest.raises(ValueError, match="worker"):
        partition_samples(3, seed=0, epoch=0, world_size=1, rank=0, num_workers=2, worker_id=2)
    with pytest.raises(ValueError, match="skip"):
        partition_samples(3, seed=0, epoch=0, world_size=1, rank=0, skip=4)
