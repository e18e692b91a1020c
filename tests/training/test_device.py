"""Stored-dtype delivery (``output="stored"``) and :func:`normalize_on_device`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from tests.training.conftest import write_volumes
from voxlake.training import (
    Augmentation,
    VolumeStream,
    collate_samples,
    normalize_on_device,
    random_affine,
)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    # Unaligned sizes: patches straddle chunk edges and, at 24^3 patches, pad.
    return write_volumes(tmp_path_factory.mktemp("stored"), 5, shape=(20, 23, 17))


def _pair(selection: pd.DataFrame, **kwargs: Any) -> tuple[VolumeStream, VolumeStream]:
    kwargs.setdefault("shape", (20, 23, 17))
    kwargs.setdefault("shuffle", True)
    return (
        VolumeStream(selection, seed=3, **kwargs),
        VolumeStream(selection, seed=3, output="stored", **kwargs),
    )


def _assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32
    assert a.shape == b.shape
    # Bit patterns, so that -0.0 against 0.0 or a one-ulp difference would fail too.
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"normalize": "zscore"},
        {"normalize": "ct_window", "window": (30.0, 150.0)},
        {"normalize": "none"},
        {"normalize": "zscore", "mode": "patch", "patch_size": (16, 16, 16)},
        {"normalize": "zscore", "mode": "patch", "patch_size": (24, 24, 24)},  # padded
        {"normalize": "ct_window", "mode": "patch", "patch_size": (24, 8, 24)},
    ],
)
def test_stored_output_normalised_on_device_equals_float32_bit_for_bit(
    volumes: pd.DataFrame, kwargs: dict[str, Any]
) -> None:
    float_stream, stored_stream = _pair(volumes, patches_per_volume=2, **kwargs)
    floats, stored = list(float_stream), list(stored_stream)
    assert len(floats) == len(stored) > 0
    for reference, sample in zip(floats, stored, strict=True):
        assert sample["image"].dtype == torch.int16
        assert sample["sample"] == reference["sample"]
        out = normalize_on_device(sample, "cpu")
        assert "normalization" not in out and "valid" not in out
        _assert_bitwise(out["image"], reference["image"])
    if kwargs.get("patch_size") == (24, 24, 24):
        assert any(s["valid"][:, 1].lt(24).any() or s["valid"][:, 0].gt(0).any() for s in stored)


@pytest.mark.parametrize("clip", [False, True])
def test_the_torch_kernels_gpus_run_agree_with_the_numpy_ones(clip: bool) -> None:
    from voxlake.training.device import _normalize_on_cpu, _normalize_with_torch

    generator = torch.Generator().manual_seed(0)
    image = torch.randint(-1024, 3000, (3, 1, 9, 10, 11), dtype=torch.int16, generator=generator)
    params = torch.tensor(
        [[-7.3, 1 / 311.0, 0.0, 1.0], [12.0, 0.25, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]]
    )
    if not clip:
        params[:, 2:] = torch.tensor([-torch.inf, torch.inf])
    _assert_bitwise(
        _normalize_with_torch(image, params, clip=clip),
        _normalize_on_cpu(image, params, clip=clip),
    )


def test_collated_batches_through_workers_match(volumes: pd.DataFrame) -> None:
    kwargs = dict(mode="patch", patch_size=(24, 24, 24), patches_per_volume=3, batch_size=4)
    float_stream, stored_stream = _pair(volumes, **kwargs)
    floats = list(DataLoader(float_stream, batch_size=4, collate_fn=collate_samples))
    stored = list(
        DataLoader(stored_stream, batch_size=4, num_workers=2, collate_fn=collate_samples)
    )
    assert len(floats) == len(stored)
    for reference, batch in zip(floats, stored, strict=True):
        assert batch["image"].dtype == torch.int16
        assert batch["normalization"].shape == (len(batch["image"]), 4)
        out = normalize_on_device(batch, torch.device("cpu"))
        _assert_bitwise(out["image"], reference["image"])
        assert torch.equal(out["label"], reference["label"])


def test_flips_on_stored_values_match_flips_on_floats(volumes: pd.DataFrame) -> None:
    flips = Augmentation(flip_prob=0.5)
    kwargs = dict(mode="patch", patch_size=(24, 24, 24), patches_per_volume=4, augment=flips)
    float_stream, stored_stream = _pair(volumes, **kwargs)
    flipped_valid = 0
    for reference, sample in zip(float_stream, stored_stream, strict=True):
        _assert_bitwise(normalize_on_device(sample, "cpu")["image"], reference["image"])
        # Padding sits at the end of each axis here: a flip moves it to the start.
        flipped_valid += int(sample["valid"][:, 0].gt(0).any())
    assert flipped_valid > 0


def test_affine_and_resizing_need_float32(volumes: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="affine"):
        VolumeStream(volumes, output="stored", augment=Augmentation(affine_prob=0.5))
    with pytest.raises(ValueError, match="output"):
        VolumeStream(volumes, output="float16")  # type: ignore[arg-type]
    resized = VolumeStream(volumes, output="stored", shape=(8, 8, 8))
    with pytest.raises(ValueError, match="unresized"):
        next(iter(resized))
    # The documented route: normalise first, then the affine on float32.
    stream = VolumeStream(volumes, output="stored", shape=(20, 23, 17), label_column=None)
    image = normalize_on_device(next(iter(stream)), "cpu")["image"]
    moved = random_affine(image, torch.Generator().manual_seed(0))
    assert moved.shape == image.shape and moved.dtype == torch.float32


def test_own_statistics_fallback_is_carried(tmp_path: Path) -> None:
    selection = write_volumes(tmp_path, 2, shape=(12, 12, 12)).drop(
        columns=["intensity_mean", "intensity_std"]
    )
    float_stream, stored_stream = _pair(selection, shape=(12, 12, 12))
    for reference, sample in zip(float_stream, stored_stream, strict=True):
        raw = sample["image"].numpy().astype(np.float64)
        assert float(sample["normalization"][0]) == pytest.approx(raw.mean(), rel=1e-6)
        _assert_bitwise(normalize_on_device(sample, "cpu")["image"], reference["image"])


def test_float_stores_are_delivered_unnormalised_too(tmp_path: Path) -> None:
    from voxlake.volumes import volume_path, write_volume

    data = np.random.default_rng(2).normal(100.0, 30.0, (12, 13, 14)).astype(np.float32)
    path = volume_path("ab" * 16, "cd" * 4)
    write_volume(tmp_path, path, data, attributes={"volume_id": "ab" * 16, "spacing": [1, 1, 1]})
    selection = pd.DataFrame(
        {"volume_id": ["ab" * 16], "store_path": [path], "intensity_mean": [90.0],
         "intensity_std": [25.0]}
    )  # fmt: skip
    float_stream, stored_stream = _pair(
        selection, store=tmp_path, shape=(12, 13, 14), label_column=None
    )
    (reference,), (sample,) = list(float_stream), list(stored_stream)
    np.testing.assert_array_equal(sample["image"][0].numpy(), data)  # not normalised
    _assert_bitwise(normalize_on_device(sample, "cpu")["image"], reference["image"])


def test_float32_batches_are_only_moved(volumes: pd.DataFrame) -> None:
    stream = VolumeStream(volumes, shape=(20, 23, 17), shuffle=False)
    sample = next(iter(stream))
    out = normalize_on_device(sample, "cpu")
    assert out["image"] is sample["image"] or torch.equal(out["image"], sample["image"])
    assert set(out) == set(sample)
