"""Reused image buffers (``VolumeStream(reuse_buffers=...)``, ``BufferPool``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from tests.training.conftest import write_volumes
from voxlake.training import VolumeStream
from voxlake.training._output import BufferPool, output_tensor


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    # Unaligned sizes: patches straddle chunk edges and, at 24^3 patches, pad.
    return write_volumes(tmp_path_factory.mktemp("buffers"), 6, shape=(20, 23, 17))


def _take(pool: BufferPool, zero: bool = False) -> torch.Tensor:
    return output_tensor((2, 3), shared=False, dtype=np.int16, pool=pool, zero=zero)


@pytest.mark.parametrize(
    "keep",
    [
        lambda t: t[None],  # a view
        lambda t: t.untyped_storage(),
        lambda t: t.numpy(),
    ],
    ids=["view", "storage", "numpy"],
)
def test_a_buffer_is_reused_only_once_nothing_refers_to_it(keep: Any) -> None:
    pool = BufferPool(2)
    a, b = _take(pool), _take(pool)
    first = a.data_ptr()
    a.fill_(7)
    c = _take(pool)  # both pooled buffers are held: a fresh, unpooled one
    assert c.data_ptr() not in (first, b.data_ptr()) and pool.reused == 0
    held = keep(a)
    del a
    assert _take(pool).data_ptr() != first and pool.reused == 0  # still reachable
    del held
    d = _take(pool, zero=True)
    assert d.data_ptr() == first and pool.reused == 1
    assert not d.any()  # zero-filled on request, whatever it held before
    assert b.data_ptr() != d.data_ptr()


def test_a_free_buffer_of_another_shape_makes_room() -> None:
    pool = BufferPool(1)
    small = output_tensor((4,), shared=False, dtype=np.int16, pool=pool)
    held = output_tensor((8,), shared=False, dtype=np.int16, pool=pool)  # pool full
    del small
    large = output_tensor((8,), shared=False, dtype=np.float32, pool=pool)
    ptr = large.data_ptr()
    del large
    again = output_tensor((8,), shared=False, dtype=np.float32, pool=pool)
    assert again.data_ptr() == ptr and pool.reused == 1
    assert held.shape == (8,)


def test_no_pool_by_default() -> None:
    pool = BufferPool(0)
    a = _take(pool)
    del a
    assert pool.take((2, 3), np.dtype(np.int16)) is None and pool.reused == 0


def _epoch(stream: VolumeStream, epoch: int) -> list[dict[str, Any]]:
    stream.set_epoch(epoch)
    return [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in stream
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"output": "stored"},
        {"output": "float32"},
        {"output": "stored", "mode": "patch", "patch_size": (24, 24, 24)},  # padded
        {"output": "float32", "mode": "patch", "patch_size": (24, 24, 24), "prefetch": 0},
    ],
)
def test_reused_buffers_give_the_same_samples(
    volumes: pd.DataFrame, kwargs: dict[str, Any]
) -> None:
    common: dict[str, Any] = {"shape": (20, 23, 17), "seed": 5, "patches_per_volume": 3}
    reference = VolumeStream(volumes, **common, **kwargs)
    stream = VolumeStream(volumes, **common, **kwargs, reuse_buffers=6)
    pointers: set[int] = set()
    delivered = 0
    for epoch in range(2):  # the second epoch overwrites the first one's images
        expected = _epoch(reference, epoch)
        stream.set_epoch(epoch)
        for sample, wanted in zip(stream, expected, strict=True):
            assert sample["sample"] == wanted["sample"]
            # Pad regions too: a reused buffer is zero-filled where nothing is read.
            assert torch.equal(sample["image"], wanted["image"])
            pointers.add(sample["image"].data_ptr())
            delivered += 1
            del sample  # released at once: its buffer may be written again
    # At most prefetch + 3 images are alive at once (reads in flight, the one delivered
    # and the one before it, still named by the loops), so six buffers always suffice:
    # every image after the first few is written into a released one.
    assert delivered >= 12 and len(pointers) <= 6
    assert stream._process_reader().buffers.reused == delivered - len(pointers)


def test_images_kept_by_the_caller_are_never_overwritten(volumes: pd.DataFrame) -> None:
    kwargs: dict[str, Any] = {"shape": (20, 23, 17), "output": "stored", "shuffle": False}
    expected = list(VolumeStream(volumes, **kwargs))
    stream = VolumeStream(volumes, **kwargs, reuse_buffers=2)
    kept = list(stream)  # every image still referenced: none may be reused
    assert stream._process_reader().buffers.reused == 0
    assert len({s["image"].data_ptr() for s in kept}) == len(kept)
    for sample, wanted in zip(kept, expected, strict=True):
        assert torch.equal(sample["image"], wanted["image"])


def test_reuse_buffers_must_not_be_negative(volumes: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="reuse_buffers"):
        VolumeStream(volumes, reuse_buffers=-1)
