"""Class-location indexes written beside real stored volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from voxlake.volumes import open_volume, volume_path, write_volume
from voxlake.volumes.foreground import (
    compute_foreground_index,
    read_foreground_index,
    write_foreground_index,
)

PATH = volume_path("ef" * 8, "01" * 4)


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, np.ndarray]:
    data = np.zeros((140, 40, 30), np.int16)  # 2 shards in z: the scan goes slab by slab
    data[10:20, 5:10, 5:10] = 500  # 250 voxels
    data[130:135, 30:32, 20:22] = 900  # 20 voxels in the second shard
    write_volume(tmp_path, PATH, data, attributes={"volume_id": "ef" * 8, "spacing": [1, 1, 1]})
    return tmp_path, data


def test_threshold_index_samples_foreground_voxels_only(stored: tuple[Path, np.ndarray]) -> None:
    root, data = stored
    assert read_foreground_index(root, PATH) is None
    written = write_foreground_index(root, PATH, threshold=100, max_points=50, seed=3)
    assert written.counts == {1: 270}
    assert written.points.shape == (50, 4) and written.classes == [1]
    z, y, x = written.of_class(1).T
    assert (data[z, y, x] > 100).all()
    assert len({tuple(p) for p in written.points}) == 50  # without replacement
    read = read_foreground_index(root, PATH)
    assert read is not None and np.array_equal(read.points, written.points)
    assert (read.counts, read.source, read.threshold) == ({1: 270}, "threshold", 100.0)
    # Deterministic per seed, and every point kept when there are fewer than max_points.
    again = compute_foreground_index(open_volume(root, PATH), threshold=100, max_points=50, seed=3)
    assert np.array_equal(again.points, written.points)
    everything = compute_foreground_index(data, threshold=100, max_points=1000)
    assert len(everything.points) == 270


def test_sampling_is_uniform_across_slabs(stored: tuple[Path, np.ndarray]) -> None:
    _, data = stored
    # 20 of 270 voxels (7.4 %) lie in the second slab; a uniform sample keeps that share.
    shares = [
        (
            compute_foreground_index(data, threshold=100, max_points=27, seed=s).points[:, 1] >= 128
        ).mean()
        for s in range(200)
    ]
    assert float(np.mean(shares)) == pytest.approx(20 / 270, abs=0.01)


def test_label_maps_give_one_point_set_per_class(stored: tuple[Path, np.ndarray]) -> None:
    root, data = stored
    labels = np.zeros(data.shape, np.uint8)
    labels[data == 500] = 1
    labels[data == 900] = 2
    index = write_foreground_index(root, PATH, labels=labels, max_points=10)
    assert index.classes == [1, 2] and index.counts == {1: 250, 2: 20}
    for label, value in ((1, 500), (2, 900)):
        z, y, x = index.of_class(label).T
        assert len(z) == 10 and (data[z, y, x] == value).all()
    with pytest.raises(ValueError, match="exactly one"):
        compute_foreground_index(data)


def test_a_volume_without_foreground_stores_an_empty_index(
    stored: tuple[Path, np.ndarray],
) -> None:
    root, _ = stored
    write_foreground_index(root, PATH, threshold=10_000)
    index = read_foreground_index(root, PATH)
    assert index is not None and index.points.shape == (0, 4) and index.classes == []
