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


@pytest.mark.integration
def test_ingest_with_preprocessing_records_steps_and_writes_a_pyramid(
    tmp_path, tiny_sample, dask_client
):
    import json

    import zarr

    from voxlake.catalog import open_catalog
    from voxlake.config import IngestConfig
    from voxlake.ingest import ingest
    from voxlake.keys import keyed_hash
    from voxlake.volumes import read_volume

    from ..conftest import SECRET

    config = IngestConfig(
        secret=SECRET,
        preprocess=PreprocessConfig(
            target_spacing=(4.0, 2.0, 2.0), clip=(-1000, 1000), pyramid_levels=1
        ),
    )
    report = ingest(
        [tiny_sample.root / "dicom"],
        catalog=tmp_path / "cat",
        store=tmp_path / "vol.zarr",
        config=config,
        client=dask_client,
    )
    assert report.failures == 0, report.failures_by_code
    catalog = open_catalog(tmp_path / "cat")
    series = tiny_sample.series[0]
    row = catalog.volumes.set_index("series_key").loc[
        keyed_hash(SECRET, "series", series.spec.series_instance_uid)
    ]
    steps = [step["step"] for step in json.loads(row.preprocessing)]
    assert steps == ["resample", "clip", "pyramid"]
    assert list(row.spacing) == pytest.approx([4.0, 2.0, 2.0], rel=0.2)
    data, attrs = read_volume(row.store_url, row.store_path)
    assert data.max() <= 1000 and data.dtype == np.float32
    # The affine maps the resampled grid onto the same field of view as the original.
    original = series.expected_affine()
    corner = [-0.5, -0.5, -0.5, 1]
    np.testing.assert_allclose(
        np.array(row.affine).reshape(4, 4) @ corner, original @ corner, atol=1e-6
    )
    group = zarr.open_group(f"{row.store_url}/{row.store_path}", mode="r")
    level1 = group["1"]
    assert level1.shape == tuple((n + 1) // 2 for n in data.shape)
    datasets = attrs["ome"]["multiscales"][0]["datasets"] if "ome" in attrs else None
    ome = dict(group.attrs)["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in ome] == ["0", "1"]
    assert datasets is None or datasets == ome
    # Changing the preprocessing makes a new revision; the same config rebuilds nothing.
    again = ingest(
        [tiny_sample.root / "dicom"],
        catalog=tmp_path / "cat",
        store=tmp_path / "vol.zarr",
        config=config,
        client=dask_client,
    )
    assert again.volumes_written == 0
