"""Patch mode of VolumeStream on real stores: geometry, determinism, sampling, bytes read."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from voxlake.training import VolumeStream, partition_samples
from voxlake.training.patches import patch_origin
from voxlake.volumes import read_volume
from voxlake.volumes.counting import CountingStore
from voxlake.volumes.foreground import ForegroundIndex, write_foreground_index

from .conftest import write_volumes


@pytest.fixture(scope="module")
def four_volumes(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Four 40 x 36 x 32 volumes (odd ones with a bright centre cube)."""
    return write_volumes(tmp_path_factory.mktemp("store4"), 4, shape=(40, 36, 32), seed=2)


def raw(selection: pd.DataFrame, index: int) -> np.ndarray:
    data, _ = read_volume(selection.store_url[index], selection.store_path[index])
    return data


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 40)] * 3),
    size=st.tuples(*[st.integers(1, 24)] * 3),
    sample=st.integers(0, 10_000),
)
def test_uniform_origins_keep_patches_inside_or_centred(
    shape: tuple[int, int, int], size: tuple[int, int, int], sample: int
) -> None:
    origin = patch_origin(shape, size, seed=1, epoch=2, sample=sample)
    assert origin == patch_origin(shape, size, seed=1, epoch=2, sample=sample)
    for dim, extent, start in zip(shape, size, origin, strict=True):
        if dim >= extent:
            assert 0 <= start <= dim - extent
        else:  # smaller than the patch: centred, padded evenly (the extra voxel after)
            assert start == -((extent - dim) // 2)


def test_origins_cover_every_position_and_vary_with_epoch_and_sample() -> None:
    starts = {
        patch_origin((20, 8, 8), (16, 8, 8), seed=0, epoch=0, sample=s)[0] for s in range(400)
    }
    assert starts == set(range(5))
    by_epoch = {patch_origin((99, 99, 99), (8, 8, 8), seed=0, epoch=e, sample=3) for e in range(5)}
    assert len(by_epoch) == 5


def test_foreground_sampler_centres_on_index_points_and_balances_classes() -> None:
    points = np.array([[1, 5, 5, 5]] + [[2, 30, 30, 30]] * 1 + [[2, 31, 30, 30]] * 99, np.int32)
    index = ForegroundIndex(points, {1: 1, 2: 100})
    origins = [
        patch_origin((40, 40, 40), (8, 8, 8), seed=0, epoch=0, sample=s, sampler="foreground",
                     foreground=index, foreground_prob=1.0)
        for s in range(400)
    ]  # fmt: skip
    near_rare = sum(o == (1, 1, 1) for o in origins)  # centre (5, 5, 5) - 4
    # Class chosen first, uniformly: the single class-1 point gets half the patches.
    assert 150 < near_rare < 250
    assert all(o in {(1, 1, 1), (26, 26, 26), (27, 26, 26)} for o in origins)
    half = [
        patch_origin((40, 40, 40), (8, 8, 8), seed=0, epoch=0, sample=s, sampler="foreground",
                     foreground=index, foreground_prob=0.5)
        for s in range(400)
    ]  # fmt: skip
    assert 120 < sum(o in {(1, 1, 1), (26, 26, 26), (27, 26, 26)} for o in half) < 280


def test_patches_are_exact_regions_of_the_stored_volume(four_volumes: pd.DataFrame) -> None:
    stream = VolumeStream(
        four_volumes, mode="patch", patch_size=(16, 16, 16), patches_per_volume=3,
        normalize="none", seed=7,
    )  # fmt: skip
    assert stream.num_samples == 12 and len(stream) == 12
    samples = list(stream)
    assert sorted(s["sample"] for s in samples) == list(range(12))
    assert [s["sample"] for s in samples] == partition_samples(
        12, seed=7, epoch=0, world_size=1, rank=0
    ).tolist()
    for item in samples:
        assert item["index"] == item["sample"] // 3
        assert item["image"].shape == (1, 16, 16, 16)
        z, y, x = item["origin"].tolist()
        region = raw(four_volumes, item["index"])[z : z + 16, y : y + 16, x : x + 16]
        assert np.array_equal(item["image"][0].numpy(), region.astype(np.float32))
        assert item["volume_id"] == four_volumes.volume_id[item["index"]]


def test_small_volumes_are_padded_with_zero_after_normalisation(
    four_volumes: pd.DataFrame,
) -> None:
    stream = VolumeStream(four_volumes.iloc[:1], mode="patch", patch_size=(48, 36, 40))
    item = next(iter(stream))
    assert item["image"].shape == (1, 48, 36, 40)
    assert item["origin"].tolist() == [-4, 0, -4]
    volume = raw(four_volumes, 0).astype(np.float64)
    expected = (volume - four_volumes.intensity_mean[0]) / four_volumes.intensity_std[0]
    image = item["image"][0].numpy()
    assert np.allclose(image[4:44, :, 4:36], expected, atol=1e-4)
    assert not image[:4].any() and not image[44:].any() and not image[:, :, :4].any()


def test_patch_zscore_falls_back_to_the_stored_statistics(four_volumes: pd.DataFrame) -> None:
    with_stats = VolumeStream(four_volumes, mode="patch", patch_size=(8, 8, 8), shuffle=False)
    without = VolumeStream(
        four_volumes.drop(columns=["intensity_mean", "intensity_std"]),
        mode="patch", patch_size=(8, 8, 8), shuffle=False,
    )  # fmt: skip
    for a, b in zip(with_stats, without, strict=True):
        torch.testing.assert_close(a["image"], b["image"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_patches_do_not_depend_on_workers_or_prefetch(four_volumes: pd.DataFrame) -> None:
    def delivered(workers: int, prefetch: int) -> list[tuple[int, list[int], float]]:
        stream = VolumeStream(
            four_volumes, mode="patch", patch_size=(8, 12, 8), patches_per_volume=5, seed=3,
            batch_size=3, prefetch=prefetch,
        )  # fmt: skip
        stream.set_epoch(2)
        out = []
        for batch in DataLoader(stream, batch_size=3, num_workers=workers):
            for s, o, img in zip(batch["sample"], batch["origin"], batch["image"], strict=True):
                out.append((int(s), o.tolist(), float(img.sum())))
        return out

    reference = delivered(0, 0)
    assert len(reference) == 20
    assert delivered(2, 2) == reference
    assert delivered(3, 0) == reference


def test_foreground_patches_contain_foreground(four_volumes: pd.DataFrame, caplog) -> None:
    # Volume 1 has a bright cube in its centre; volume 3 gets no index (uniform fallback).
    selection = four_volumes.iloc[[1, 3]].reset_index(drop=True)
    write_foreground_index(selection.store_url[0], selection.store_path[0], threshold=250)
    stream = VolumeStream(
        selection, mode="patch", patch_size=(6, 6, 6), patches_per_volume=20,
        sampler="foreground", foreground_prob=1.0, normalize="none", prefetch=0,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="voxlake.training._reader"):
        samples = list(stream)
    for item in samples:
        if item["index"] == 0:
            centre = item["image"][0, 3, 3, 3]  # the sampled point is the patch centre
            assert float(centre) > 250
    warnings = [r for r in caplog.records if "no foreground index" in r.getMessage()]
    assert len(warnings) == 1


def test_a_random_96_cube_reads_only_its_chunks(tmp_path: Path) -> None:
    selection = write_volumes(tmp_path, 1, shape=(160, 192, 160), seed=4)
    counters: list[CountingStore] = []

    def count(store: object) -> CountingStore:
        counters.append(CountingStore(store))  # type: ignore[arg-type]
        return counters[-1]

    stream = VolumeStream(
        selection, mode="patch", patch_size=(96, 96, 96), patches_per_volume=6,
        wrap_store=count, prefetch=0,
    )  # fmt: skip
    items = iter(stream)
    next(items)  # opens the array (metadata) and reads one patch
    for item in items:
        counters[0].reset()
        stream.read_sample(item["sample"])
        # At most 27 chunks of 64^3 int16 (uncompressed upper bound) plus 2 shard indexes,
        # far below the 2 shards (160 x 192 x 160 x 2 bytes) a whole-shard read would take.
        assert 0 < counters[0].bytes_read <= 27 * 64**3 * 2 + 2 * 4100
        assert counters[0].requests <= 27 + 2
    assert len(counters) == 1  # one store per process, opened once


def test_patch_mode_resumes_exactly_in_a_new_stream(four_volumes: pd.DataFrame) -> None:
    def make() -> VolumeStream:
        stream = VolumeStream(
            four_volumes, mode="patch", patch_size=(8, 8, 8), patches_per_volume=4, seed=9,
            batch_size=2,
        )  # fmt: skip
        stream.set_epoch(3)
        return stream

    full = [(int(s), o.tolist()) for b in DataLoader(make(), batch_size=2)
            for s, o in zip(b["sample"], b["origin"], strict=True)]  # fmt: skip
    first = make()
    seen = []
    for batch in DataLoader(first, batch_size=2, num_workers=2):
        seen += [
            (int(s), o.tolist()) for s, o in zip(batch["sample"], batch["origin"], strict=True)
        ]
        if len(seen) == 6:
            break
    state = first.state_dict(samples_yielded=len(seen))
    assert state["mode"] == "patch" and len(repr(state)) < 400
    resumed = VolumeStream(
        four_volumes, mode="patch", patch_size=(8, 8, 8), patches_per_volume=4, batch_size=2
    )
    resumed.load_state_dict(state)
    resumed.set_epoch(3)
    rest = [(int(s), o.tolist()) for b in DataLoader(resumed, batch_size=2, num_workers=1)
            for s, o in zip(b["sample"], b["origin"], strict=True)]  # fmt: skip
    assert seen + rest == full
    other = VolumeStream(four_volumes, mode="patch", patch_size=(8, 8, 8), patches_per_volume=2)
    with pytest.raises(ValueError, match="patch settings"):
        other.load_state_dict(state)
