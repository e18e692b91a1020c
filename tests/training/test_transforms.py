from __future__ import annotations

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
