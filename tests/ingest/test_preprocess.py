"""Preprocessing steps: exact affines, independent numeric checks."""

from __future__ import annotations

import numpy as np
import pytest

from voxlake.config import PreprocessConfig
from voxlake.errors import ConfigError
from voxlake.ingest.preprocess import (
    apply_preprocessing,
    clip_intensity,
    crop_foreground,
    downsample2,
    n4_bias_correct,
    resample_to_spacing,
)


def oblique_affine(spacing_zyx=(2.5, 0.8, 0.6)):
    theta = np.deg2rad(20)
    rot = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing_zyx[::-1])
    affine[:3, 3] = [-40.0, 12.5, 100.0]
    return affine


def world_grid(shape, affine):
    k, j, i = np.indices(shape)
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1)
    return ijk1 @ affine.T  # (..., 4)


def test_resample_preserves_a_linear_field_through_the_new_affine():
    affine = oblique_affine()
    shape = (12, 30, 40)
    coefficients = np.array([0.7, -1.3, 0.4])
    volume = (world_grid(shape, affine)[..., :3] @ coefficients).astype(np.float32)
    out, new_affine, record = resample_to_spacing(volume, affine, (1.0, 1.6, 1.2))
    assert out.shape == (30, 15, 20)
    assert record["step"] == "resample"
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), [1.2, 1.6, 1.0])
    expected = world_grid(out.shape, new_affine)[..., :3] @ coefficients
    inner = (slice(2, -2),) * 3  # interpolation of a linear field is exact away from edges
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-3)
    # The field of view (outer corner to outer corner) is unchanged.
    corner_old = affine @ [-0.5, -0.5, -0.5, 1]
    corner_new = new_affine @ [-0.5, -0.5, -0.5, 1]
    np.testing.assert_allclose(corner_old, corner_new, atol=1e-9)


def test_crop_shifts_the_origin_exactly():
    affine = oblique_affine()
    volume = np.full((10, 20, 30), -1000, np.int16)
    volume[3:6, 5:15, 7:9] = 40
    cropped, new_affine, record = crop_foreground(volume, affine, -500, margin=1)
    assert cropped.shape == (5, 12, 4)
    np.testing.assert_allclose(new_affine @ [0, 0, 0, 1], affine @ [6, 4, 2, 1])
    assert np.array_equal(cropped, volume[2:7, 4:16, 6:10])
    assert record["box_zyx"] == [[2, 4, 6], [7, 16, 10]]


def test_clip_and_downsample():
    volume = np.arange(-3000, 3000, 10, dtype=np.int16).reshape(6, 10, 10)
    clipped, _ = clip_intensity(volume, -1000, 1000)
    assert clipped.min() == -1000 and clipped.max() == 1000 and clipped.dtype == np.int16
    with pytest.raises(ConfigError):
        clip_intensity(volume, 5, 5)
    data = np.random.default_rng(0).normal(size=(4, 6, 8)).astype(np.float32)
    small = downsample2(data)
    assert small.shape == (2, 3, 4)
    assert small[1, 2, 3] == pytest.approx(data[2:4, 4:6, 6:8].mean(), rel=1e-5)


def test_n4_reduces_a_smooth_bias_field():
    pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(1)
    _, y, x = np.indices((16, 48, 48))
    tissue = (y - 24) ** 2 + (x - 24) ** 2 < 18**2
    truth = np.where(tissue, 500.0, 5.0) + rng.normal(0, 5, tissue.shape)
    bias = np.exp(0.6 * (x - 24) / 24)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    corrected, record = n4_bias_correct(truth * bias, affine)

    def cv(v):
        return v[tissue].std() / v[tissue].mean()

    assert cv(corrected) < 0.6 * cv(truth * bias)
    assert record["step"] == "n4"


def test_apply_in_order_records_every_step():
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    volume = np.full((8, 40, 40), -1000, np.int16)
    volume[2:6, 10:30, 10:30] = 50
    config = PreprocessConfig(
        target_spacing=(2.0, 1.0, 1.0), clip=(-1000, 1000), crop_threshold=-500
    )
    out, new_affine, records = apply_preprocessing(volume, affine, config, modality="CT")
    assert [r["step"] for r in records] == ["resample", "clip", "crop_foreground"]
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), [1.0, 1.0, 2.0])
    assert out.max() <= 1000
    assert out.shape[1:] == (14, 14)  # 20x20 after resampling, cropped to 10 + 2 margins
