"""The stream's read paths: the lean sharded reader and zarr deliver identical samples,
channel-first volumes stream as (C, z, y, x), and worker samples batch without copies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, default_collate

from voxlake.training import VolumeStream, collate_samples
from voxlake.volumes import volume_path

from .conftest import write_volumes


@pytest.fixture(scope="module")
def odd_volumes(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Three volumes of an odd shape: partial 64^3 chunks, two shards along z."""
    return write_volumes(tmp_path_factory.mktemp("odd"), 3, shape=(150, 70, 75))


def samples(stream: VolumeStream) -> list[dict[str, Any]]:
    return list(stream)


@pytest.mark.parametrize("normalize", ["zscore", "ct_window", "none"])
@pytest.mark.parametrize("mode", ["volume", "patch"])
def test_lean_and_zarr_paths_deliver_identical_samples(
    odd_volumes: pd.DataFrame, normalize: str, mode: str
) -> None:
    kwargs: dict[str, Any] = dict(
        shape=(150, 70, 75),
        mode=mode,
        patch_size=(96, 80, 64),  # taller than two dims of the volume: padded patches
        patches_per_volume=3,
        normalize=normalize,
        seed=5,
    )
    lean = samples(VolumeStream(odd_volumes, **kwargs))
    plain = samples(VolumeStream(odd_volumes, lean=False, **kwargs))
    assert len(lean) == len(plain) == (9 if mode == "patch" else 3)
    for a, b in zip(lean, plain, strict=True):
        assert a["sample"] == b["sample"]
        assert a["image"].dtype == torch.float32
        assert torch.equal(a["image"], b["image"])
        if mode == "patch":
            assert a["image"].shape == (1, 96, 80, 64)
            assert torch.equal(a["origin"], b["origin"])


def test_missing_statistics_fall_back_identically(odd_volumes: pd.DataFrame) -> None:
    no_stats = odd_volumes.assign(intensity_mean=np.nan, intensity_std=np.nan)
    for mode in ("volume", "patch"):
        kwargs: dict[str, Any] = dict(shape=(150, 70, 75), mode=mode, patch_size=(32, 32, 32))
        lean = samples(VolumeStream(no_stats, **kwargs))
        plain = samples(VolumeStream(no_stats, lean=False, **kwargs))
        for a, b in zip(lean, plain, strict=True):
            assert torch.equal(a["image"], b["image"])
    whole = samples(VolumeStream(no_stats, shape=(150, 70, 75)))
    assert abs(float(whole[0]["image"].mean())) < 1e-4  # the volume's own statistics


def write_channel_volume(root: Path, data: np.ndarray) -> str:
    """A hand-written OME-Zarr 0.5 volume with axes (c, z, y, x), as the writer will make."""
    path = volume_path("cd" * 8, "ef" * 4)
    group = zarr.open_group(zarr.storage.LocalStore(root), path=path, mode="w")
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"
    ]
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "name": "rgb",
                "axes": axes,
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [{"type": "scale", "scale": [1] * 4}],
                    }
                ],
            }
        ],
    }
    group.attrs["voxlake"] = {"volume_id": "cd" * 8, "complete": True}
    array = group.create_array(
        "0", shape=data.shape, dtype=data.dtype, chunks=(1, 8, 8, 8), shards=(1, 16, 16, 16)
    )
    array[...] = data
    return path


@pytest.mark.parametrize("lean", [True, False])
def test_channel_axis_volumes_stream_as_channel_first_images(tmp_path: Path, lean: bool) -> None:
    rng = np.random.default_rng(2)
    data = rng.integers(0, 255, (3, 20, 18, 17)).astype(np.uint8)
    path = write_channel_volume(tmp_path, data)
    selection = pd.DataFrame({"volume_id": ["cd" * 8], "store_path": [path], "label": [1.0]})
    whole = next(
        iter(VolumeStream(selection, tmp_path, shape=(20, 18, 17), normalize="none", lean=lean))
    )
    assert whole["image"].shape == (3, 20, 18, 17)
    assert np.array_equal(whole["image"].numpy(), data.astype(np.float32))
    resized = next(iter(VolumeStream(selection, tmp_path, shape=(10, 9, 8), lean=lean)))
    assert resized["image"].shape == (3, 10, 9, 8)
    stream = VolumeStream(
        selection,
        tmp_path,
        mode="patch",
        patch_size=(8, 24, 8),  # taller than y: padded with 0 after normalisation
        patches_per_volume=4,
        normalize="ct_window",
        window=(128.0, 256.0),
        lean=lean,
    )
    for sample in stream:
        z, y, x = (int(v) for v in sample["origin"])
        assert sample["image"].shape == (3, 8, 24, 8)
        part = data[:, z : z + 8, max(y, 0) : y + 24, x : x + 8].astype(np.float32)
        expected = np.zeros((3, 8, 24, 8), np.float32)
        expected[:, :, -y : -y + 18] = np.clip((part - np.float32(0.0)) * np.float32(1 / 256), 0, 1)
        assert y == -3  # centred: (24 - 18) // 2 voxels of padding above
        np.testing.assert_array_equal(sample["image"].numpy(), expected)


def test_collate_samples_matches_default_collate_without_copying(
    odd_volumes: pd.DataFrame,
) -> None:
    stream = VolumeStream(odd_volumes, shape=(150, 70, 75), shuffle=False)
    one = next(iter(stream))
    batch = collate_samples([one])
    reference = default_collate([one])
    assert batch.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(batch[key], value)
        else:
            assert batch[key] == value
    assert batch["image"].data_ptr() == one["image"].data_ptr()  # a view, not a copy
    pair = collate_samples([one, one])
    assert pair["image"].shape == (2, 1, 150, 70, 75)


def test_batches_of_several_samples_equal_default_collate(odd_volumes: pd.DataFrame) -> None:
    kwargs = dict(mode="patch", patch_size=(40, 40, 48), patches_per_volume=3, batch_size=3)
    stream = VolumeStream(odd_volumes, **kwargs)
    samples = list(stream)
    assert len(samples) >= 3
    for workers in (0, 2):
        loader = DataLoader(stream, batch_size=3, num_workers=workers, collate_fn=collate_samples)
        references = [default_collate(samples[i : i + 3]) for i in range(0, len(samples), 3)]
        batches = list(loader)  # all kept: a later batch must not overwrite an earlier one
        assert len(batches) == len(references)
        for batch, reference in zip(batches, references, strict=True):
            assert batch.keys() == reference.keys()
            for key, value in reference.items():
                if isinstance(value, torch.Tensor):
                    assert batch[key].dtype == value.dtype
                    assert torch.equal(batch[key], value), key
                else:
                    assert batch[key] == value


def test_worker_samples_arrive_equal_through_shared_memory(odd_volumes: pd.DataFrame) -> None:
    stream = VolumeStream(odd_volumes, mode="patch", patch_size=(40, 40, 40), patches_per_volume=4)
    expected = [s["image"] for s in stream]
    for collate in (collate_samples, None):
        loader = DataLoader(stream, batch_size=1, num_workers=2, collate_fn=collate)
        got = [batch["image"][0] for batch in loader]
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


def test_rgb_volumes_from_the_writer_stream_channel_first(tmp_path: Path) -> None:
    import inspect

    from voxlake.volumes import write_volume

    if "axes" not in inspect.signature(write_volume).parameters:
        pytest.skip("the writer does not take axes yet")
    rng = np.random.default_rng(4)
    data = rng.integers(0, 255, (3, 70, 40, 45)).astype(np.uint8)
    path = volume_path("ef" * 8, "ab" * 4)
    write_volume(
        tmp_path,
        path,
        data,
        attributes={"volume_id": "ef" * 8, "spacing": [1, 1, 1]},
        axes="czyx",
    )
    selection = pd.DataFrame({"volume_id": ["ef" * 8], "store_path": [path], "label": [0.0]})
    for lean in (True, False):
        whole = next(
            iter(VolumeStream(selection, tmp_path, shape=(70, 40, 45), normalize="none", lean=lean))
        )
        assert np.array_equal(whole["image"].numpy(), data.astype(np.float32))
        patches = VolumeStream(
            selection,
            tmp_path,
            mode="patch",
            patch_size=(32, 32, 32),
            patches_per_volume=3,
            normalize="none",
            lean=lean,
        )
        for sample in patches:
            z, y, x = (int(v) for v in sample["origin"])
            box = data[:, z : z + 32, y : y + 32, x : x + 32].astype(np.float32)
            assert np.array_equal(sample["image"].numpy(), box)


def test_persistent_workers_follow_set_epoch_and_resume_points(
    odd_volumes: pd.DataFrame,
) -> None:
    kwargs: dict[str, Any] = dict(
        mode="patch", patch_size=(16, 16, 16), patches_per_volume=5, batch_size=2, seed=9
    )

    def expected(epoch: int) -> list[tuple[int, list[int]]]:
        reference = VolumeStream(odd_volumes, **kwargs)
        reference.set_epoch(epoch)
        return [(s["sample"], s["origin"].tolist()) for s in reference]

    stream = VolumeStream(odd_volumes, **kwargs)
    loader = DataLoader(stream, batch_size=2, num_workers=2, persistent_workers=True)

    def delivered() -> list[tuple[int, list[int]]]:
        return [
            (int(n), origin.tolist())
            for batch in loader
            for n, origin in zip(batch["sample"], batch["origin"], strict=True)
        ]

    orders = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        got = delivered()
        assert got == expected(epoch)  # same samples and patches, in order
        orders.append([n for n, _ in got])
    assert orders[0] != orders[1] != orders[2]  # the workers did not keep epoch 0
    # A resume point loaded in the main process reaches the same, persistent workers.
    stream.load_state_dict(stream.state_dict(samples_yielded=6) | {"epoch": 1})
    assert delivered() == expected(1)[6:]
