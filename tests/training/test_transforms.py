from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from voxlake.training import ct_window, random_flip, resize, zscore


def test_zscore_and_ct_window() -> None:
    volume = torch.tensor([-1000.0, -160.0, -60.0, 40.0, 240.0, 3000.0])
    torch.testing.assert_close(zscore(volume, 40.0, 200.0), (volume - 40.0) / 200.0)
    assert torch.equal(zscore(torch.ones(3), 1.0, 0.0), torch.zeros(3))  # constant volume
    torch.testing.assert_close(ct_window(volume, 40, 400), torch.tensor([0, 0, 0.25, 0.5, 1, 1]))
    with pytest.raises(ValueError, match="width"):
        ct_window(volume, 40, 0)


def test_resize_keeps_dimensions_and_constant_values() -> None:
    assert resize(torch.full((5, 7, 9), 3.0), (4, 4, 4)).shape == (4, 4, 4)
    out = resize(torch.full((2, 5, 7, 9), 3.0), (3, 6, 2))
    assert out.shape == (2, 3, 6, 2)
    torch.testing.assert_close(out, torch.full((2, 3, 6, 2), 3.0))
    with pytest.raises(ValueError, match="shape"):
        resize(torch.zeros(2, 2, 2), (2, 2))


def test_random_flip_is_reproducible_and_flips_only_the_image() -> None:
    image = torch.arange(8.0).reshape(1, 2, 2, 2)
    sample = {"image": image, "label": torch.tensor(1.0)}
    a = random_flip(sample, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(a["image"], image.flip(1, 2, 3))
    assert a["label"] is sample["label"]
    assert torch.equal(random_flip(sample, torch.Generator(), p=0.0)["image"], image)
    b = random_flip(sample, torch.Generator().manual_seed(7))
    c = random_flip(sample, torch.Generator().manual_seed(7))
    assert torch.equal(b["image"], c["image"])
    assert sample["image"] is image  # input untouched


def blob_centre(volume: torch.Tensor) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in volume.shape[-3:]],
                           indexing="ij")  # fmt: skip
    weights = volume[0].double()
    return torch.stack([(g * weights).sum() / weights.sum() for g in grids])


def test_random_affine_rotates_in_voxel_space_about_the_centre() -> None:
    from voxlake.training.transforms import random_affine

    volume = torch.zeros(1, 24, 40, 56)  # not cubic: a normalised-space rotation would shear
    volume[0, 11:13, 19:21, 37:39] = 1.0  # off-centre along x by 10 voxels
    centre = torch.tensor([11.5, 19.5, 27.5], dtype=torch.float64)
    identity = random_affine(volume, torch.Generator().manual_seed(0), max_rotation=0, max_scale=0)
    assert torch.equal(identity, volume)
    for seed in range(5):
        moved = random_affine(volume, torch.Generator().manual_seed(seed), max_scale=0.0)
        radius = (blob_centre(moved) - centre).norm()
        assert float(radius) == pytest.approx(10.0, abs=0.6)  # distances are kept
    again = random_affine(volume, torch.Generator().manual_seed(3))
    assert torch.equal(again, random_affine(volume, torch.Generator().manual_seed(3)))


def test_augmented_stream_samples_depend_only_on_seed_epoch_and_sample(
    seven_volumes: pd.DataFrame,
) -> None:
    from torch.utils.data import DataLoader

    from voxlake.training import Augmentation, VolumeStream

    augmentation = Augmentation(flip_prob=0.5, affine_prob=0.5)

    def images(workers: int, epoch: int) -> dict[int, torch.Tensor]:
        stream = VolumeStream(seven_volumes, shape=(8, 8, 8), augment=augmentation, seed=1)
        stream.set_epoch(epoch)
        loader = DataLoader(stream, batch_size=1, num_workers=workers)
        return {int(b["sample"]): b["image"][0] for b in loader}

    plain = {s["sample"]: s["image"] for s in VolumeStream(seven_volumes, shape=(8, 8, 8))}
    first = images(0, 0)
    assert all(torch.equal(first[k], v) for k, v in images(2, 0).items())
    assert any(not torch.equal(first[k], plain[k]) for k in first)  # something was augmented
    assert any(not torch.equal(first[k], v) for k, v in images(0, 1).items())  # new draws


def test_ct_window_normalisation_maps_the_window_to_unit_range(
    seven_volumes: pd.DataFrame,
) -> None:
    from voxlake.training import VolumeStream
    from voxlake.volumes import read_volume

    stream = VolumeStream(seven_volumes, shape=(8, 8, 8), normalize="ct_window", window=(0, 100),
                          shuffle=False)  # fmt: skip
    sample = next(iter(stream))
    data, _ = read_volume(seven_volumes.store_url[0], seven_volumes.store_path[0])
    expected = np.clip((data.astype(np.float64) + 50) / 100, 0, 1)
    assert np.allclose(sample["image"][0].numpy(), expected, atol=1e-6)


def test_monai_dictionary_transforms_accept_stream_samples(seven_volumes: pd.DataFrame) -> None:
    monai = pytest.importorskip("monai")
    from torch.utils.data import DataLoader

    from voxlake.training import VolumeStream

    transform = monai.transforms.Compose(
        [
            monai.transforms.ScaleIntensityd(keys="image"),
            monai.transforms.RandFlipd(keys="image", prob=1.0, spatial_axis=0),
            monai.transforms.EnsureTyped(keys=["image", "label"], track_meta=False),
        ]
    )
    stream = VolumeStream(
        seven_volumes, mode="patch", patch_size=(6, 6, 6), transform=transform, shuffle=False,
        batch_size=2,
    )  # fmt: skip
    plain = VolumeStream(seven_volumes, mode="patch", patch_size=(6, 6, 6), shuffle=False)
    batches = list(DataLoader(stream, batch_size=2, num_workers=1))  # pickled to the worker
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (7, 1, 6, 6, 6)
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    reference = next(iter(plain))["image"]
    scaled = (reference - reference.min()) / (reference.max() - reference.min())
    torch.testing.assert_close(images[0], torch.flip(scaled, dims=[1]))
    assert [int(i) for b in batches for i in b["index"]] == list(range(7))
